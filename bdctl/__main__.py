from bdctl.cli import main

main()
