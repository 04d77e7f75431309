"""`bdctl --help` stays instant: the CLI imports no torch, deepspeed or transformers.

Checked through `sys.modules` in a fresh interpreter (this test process has long imported them),
not with a wall clock, which depends on the machine and its load.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "deepspeed", "transformers")

CHECK = f"""
import json, sys
heavy = {HEAVY!r}
import bdctl.cli
after_import = sorted(m for m in heavy if m in sys.modules)
sys.argv = ["bdctl", "--help"]
try:
    bdctl.cli.main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
after_help = sorted(m for m in heavy if m in sys.modules)
print(json.dumps({{"import": after_import, "help": after_help, "code": code}}))
"""


def test_importing_the_cli_and_its_help_import_no_torch_deepspeed_or_transformers():
    shown = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=120)
    result = json.loads(shown.stdout.strip().splitlines()[-1])
    assert result["import"] == [], f"importing bdctl.cli imports {result['import']}"
    assert result["help"] == [], f"bdctl --help imports {result['help']}"
    assert result["code"] in (0, None)


QUIET = f"""
import json, sys
from bdctl.engine import quiet_libraries
from bdctl.submit import plan
quiet_libraries()
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def test_quieting_libraries_and_importing_submission_import_none_of_them():
    """Every command calls quiet_libraries first; it sets the libraries' environment variables
    instead of importing them, so `--dry-run`, eval's planning and an HTTP judge do not pay for torch."""
    shown = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(shown.stdout.strip().splitlines()[-1]) == []
