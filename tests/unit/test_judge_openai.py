"""The OpenAI-compatible judge backend against a real loopback HTTP server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bdctl.errors import UserError
from bdctl.judges import PARSE_TRIES, Pair, VerdictCache, judge_pairs
from bdctl.judges.openai_backend import OpenAIJudge
from bdctl.judges.stats import win_rate
from tests.unit.chat_server import GOOD, ChatServer, Reply, answers_of, closed_port, prefer_good

KEY_ENV = "BDCTL_TEST_JUDGE_KEY"

PAIRS = [
    Pair("win", "Name a colour.", "", f"Blue. {GOOD}", "I like turtles."),
    Pair("loss", "Add 2 and 2.", "", "Five.", f"Four. {GOOD}"),
    Pair("tie", "Summarise the text.", "The sky is blue.", f"Blue sky. {GOOD}", f"It is blue. {GOOD}"),
]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer() as running:
        yield running


def make_judge(base_url: str, **overrides: Any) -> OpenAIJudge:
    settings: dict[str, Any] = {
        "base_url": base_url,
        "api_key_env": KEY_ENV,
        "concurrency": 4,
        "max_tries": 3,
        "timeout_s": 5.0,
        "backoff_base_s": 0.01,
        "seed": 0,
    }
    settings.update(overrides)
    return OpenAIJudge("judge-model", **settings)


def scores(results: list[Any]) -> dict[str, float | None]:
    return {result.prompt_id: result.score for result in results}


def test_verdicts_in_both_orders(server: ChatServer, tmp_path: Path) -> None:
    results = judge_pairs(make_judge(server.base_url), PAIRS, VerdictCache(tmp_path / "v.jsonl"))

    assert scores(results) == {"win": 1.0, "loss": 0.0, "tie": 0.5}
    assert [tuple(j.verdict for j in r.judgments) for r in results] == [
        ("A", "B"),
        ("B", "A"),
        ("Tie", "Tie"),
    ]
    # Each pair was shown once in each order.
    shown = {answers_of(request.body) for request in server.recorded}
    expected = set()
    for pair in PAIRS:
        expected |= {(pair.answer_model, pair.answer_baseline), (pair.answer_baseline, pair.answer_model)}
    assert shown == expected and server.count == 6


def test_request_shape(server: ChatServer, tmp_path: Path) -> None:
    judge_pairs(make_judge(server.base_url, max_tokens=3), PAIRS[:1], VerdictCache(tmp_path / "v.jsonl"))
    request = server.recorded[0]
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.body["model"] == "judge-model"
    assert request.body["temperature"] == 0
    assert request.body["max_tokens"] == 3
    assert [m["role"] for m in request.body["messages"]] == ["system", "user"]
    assert "Name a colour." in request.body["messages"][1]["content"]


def test_a_position_biased_judge_scores_one_half(tmp_path: Path) -> None:
    with ChatServer(responder=lambda body: Reply(content="A")) as biased:
        results = judge_pairs(make_judge(biased.base_url), PAIRS, VerdictCache(tmp_path / "v.jsonl"))
    for result in results:
        assert [j.outcome for j in result.judgments] == [1.0, 0.0]
        assert result.score == 0.5
    # A precise-looking 50 % that measures position alone, and is flagged as such.
    record = win_rate(results)
    assert (record.win_rate, record.ci_low, record.ci_high) == (0.5, 0.5, 0.5)
    assert record.consistency == 0.0 and record.first_position == 1.0 and record.position_driven


def test_rerun_is_served_from_the_cache(server: ChatServer, tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    first = judge_pairs(make_judge(server.base_url), PAIRS, VerdictCache(path))
    assert server.count == 6
    again = judge_pairs(make_judge(server.base_url), PAIRS, VerdictCache(path))
    assert server.count == 6
    assert again == first


def test_server_error_then_success(server: ChatServer, tmp_path: Path) -> None:
    server.push(Reply(status=500, body=b'{"error": "boom"}'))
    results = judge_pairs(make_judge(server.base_url, concurrency=1), PAIRS[:1], VerdictCache(tmp_path / "v.jsonl"))
    assert results[0].score == 1.0
    assert server.count == 3  # the failed attempt, its retry, the other order


def test_rate_limit_honours_retry_after(server: ChatServer, tmp_path: Path) -> None:
    server.push(Reply(status=429, headers={"Retry-After": "0"}))
    # With a 30 s base delay, only the server's "Retry-After: 0" makes the wait 0: the test checks
    # the wait the judge chose, not the clock (a loaded machine makes any time bound flaky).
    judge = make_judge(server.base_url, concurrency=1, backoff_base_s=30.0)
    waits = record_backoffs(judge)
    results = judge_pairs(judge, PAIRS[:1], VerdictCache(tmp_path / "v.jsonl"))
    assert waits == [0.0]
    assert results[0].score == 1.0 and server.count == 3


def record_backoffs(judge: OpenAIJudge) -> list[float]:
    """The waits the judge chooses between tries, in order (it still waits them)."""
    waits: list[float] = []
    chosen = judge._backoff

    def recording(attempt: int, retry_after: float | None) -> float:
        waits.append(chosen(attempt, retry_after))
        return waits[-1]

    judge._backoff = recording  # type: ignore[method-assign]
    return waits


def test_unparseable_reply_is_asked_again(server: ChatServer, tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    server.push(Reply(content="Both answers have merit, maybe A or B"))
    results = judge_pairs(make_judge(server.base_url, concurrency=1), PAIRS[:1], VerdictCache(path))
    assert [j.verdict for j in results[0].judgments] == ["A", "B"] and results[0].score == 1.0
    assert server.count == 3  # the unreadable reply, the other order, the same request again
    assert len(VerdictCache(path)) == 2


def test_a_judge_that_never_answers_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    with ChatServer(responder=lambda body: Reply(content="Maybe")) as vague:
        results = judge_pairs(make_judge(vague.base_url), PAIRS, VerdictCache(path))
        assert vague.count == len(PAIRS) * 2 * PARSE_TRIES
    assert all(j.verdict is None and j.raw == "Maybe" for r in results for j in r.judgments)
    assert win_rate(results).unparseable == 2 * len(PAIRS) and len(VerdictCache(path)) == 0
    # The endpoint is fixed: the rerun asks everything, once.
    with ChatServer() as fixed:
        results = judge_pairs(make_judge(fixed.base_url), PAIRS, VerdictCache(path))
        assert fixed.count == 2 * len(PAIRS)
    assert scores(results) == {"win": 1.0, "loss": 0.0, "tie": 0.5}


def test_malformed_body_is_retried(server: ChatServer, tmp_path: Path) -> None:
    server.push(Reply(body=b'{"choices": [ this is not json'))
    results = judge_pairs(make_judge(server.base_url, concurrency=1), PAIRS[:1], VerdictCache(tmp_path / "v.jsonl"))
    assert results[0].score == 1.0 and server.count == 3


def test_persistently_malformed_body_is_a_user_error(tmp_path: Path) -> None:
    with ChatServer(responder=lambda body: Reply(body=b"<html>not an API</html>")) as wrong:
        with pytest.raises(UserError, match="failing after 3 tries: reply is not a chat-completions response"):
            judge_pairs(make_judge(wrong.base_url, concurrency=1), PAIRS[:1], VerdictCache(tmp_path / "v.jsonl"))


def test_timeout_then_success(server: ChatServer, tmp_path: Path) -> None:
    # The first request is never answered, so only the client's timeout ends it; the timeout is
    # long enough that a loaded machine does not time out the replies that are not meant to be slow
    # (a 0.3 s timeout once did), and the test checks which requests were made, not how fast.
    server.push(Reply(hang=True))
    judge = make_judge(server.base_url, concurrency=1, timeout_s=2.0)
    results = judge_pairs(judge, PAIRS[:1], VerdictCache(tmp_path / "v.jsonl"))
    assert results[0].score == 1.0
    bodies = [request.body for request in server.recorded]
    assert bodies[0] in bodies[1:]  # the unanswered request was asked again
    assert len(bodies) == 3  # the unanswered one, its retry, the other order


def test_client_error_is_not_retried(server: ChatServer, tmp_path: Path) -> None:
    server.push(Reply(status=401, body=b'{"error": {"message": "invalid api key"}}'))
    with pytest.raises(UserError, match=r"refused the request with HTTP 401.*invalid api key"):
        judge_pairs(make_judge(server.base_url, concurrency=1), PAIRS[:1], VerdictCache(tmp_path / "v.jsonl"))
    assert server.count == 1


def test_missing_api_key(server: ChatServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=KEY_ENV):
        judge_pairs(make_judge(server.base_url), PAIRS, VerdictCache(tmp_path / "v.jsonl"))
    assert server.count == 0


def test_unreachable_endpoint(tmp_path: Path) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(UserError) as raised:
        judge_pairs(make_judge(base_url), PAIRS, VerdictCache(tmp_path / "v.jsonl"))
    message = str(raised.value)
    assert message == f"judge endpoint {base_url} unreachable after 3 tries: connection refused"


def test_failure_mid_run_keeps_finished_verdicts(tmp_path: Path) -> None:
    healthy_requests = 2  # answered normally before the endpoint goes down

    def flaky(body: dict[str, Any]) -> Reply:
        nonlocal healthy_requests
        if healthy_requests == 0:
            return Reply(status=503, body=b"overloaded")
        healthy_requests -= 1
        return prefer_good(body)

    path = tmp_path / "v.jsonl"
    with ChatServer(responder=flaky) as server:
        judge = make_judge(server.base_url, concurrency=1)
        with pytest.raises(UserError, match=r"failing after 3 tries: HTTP 503: overloaded"):
            judge_pairs(judge, PAIRS, VerdictCache(path))
        assert server.count == 2 + 3  # two verdicts, then one request's three tries, nothing after
        assert len(VerdictCache(path)) == 2  # durable on disk

        healthy_requests = 100  # the endpoint recovers: the rerun asks only what is missing
        results = judge_pairs(judge, PAIRS, VerdictCache(path))
        assert server.count == 5 + 4
    assert scores(results) == {"win": 1.0, "loss": 0.0, "tie": 0.5}


def test_requests_run_concurrently(tmp_path: Path) -> None:
    # Each reply waits until three requests have arrived together (a barrier, not a delay): with
    # fewer at a time the barrier breaks and the replies become errors, however loaded the machine.
    together = threading.Barrier(3, timeout=30)
    met: list[bool] = []

    def three_at_a_time(body: dict[str, Any]) -> Reply:
        try:
            together.wait()
        except threading.BrokenBarrierError:
            return Reply(status=400, body=b"fewer than three requests at a time")
        met.append(True)
        return Reply(content="Tie")

    with ChatServer(responder=three_at_a_time) as server:
        judge_pairs(make_judge(server.base_url, concurrency=3), PAIRS, VerdictCache(tmp_path / "v.jsonl"))
        assert server.count == 6 and len(met) == 6
        assert server.max_in_flight <= 3


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    from bdctl.judges.openai_backend import _parse_retry_after

    judge = make_judge("http://127.0.0.1:1/v1", backoff_base_s=1.0, backoff_max_s=5.0)
    for attempt, full in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)):
        delays = {judge._backoff(attempt, None) for _ in range(20)}
        assert all(full / 2 <= delay <= full for delay in delays) and len(delays) > 1
    assert judge._backoff(1, 0.0) == 0.0
    assert judge._backoff(1, 120.0) == 5.0  # capped: a run never stalls for long

    assert _parse_retry_after("3") == 3.0
    assert _parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert _parse_retry_after("soon") is None
    assert _parse_retry_after("nan") is None
    assert _parse_retry_after(None) is None


def test_invalid_settings_are_user_errors() -> None:
    with pytest.raises(UserError, match="must start with http"):
        OpenAIJudge("m", base_url="127.0.0.1:8000/v1")
    with pytest.raises(UserError, match="max_tries is 0"):
        OpenAIJudge("m", max_tries=0)
