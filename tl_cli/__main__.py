from tl_cli.cli import main

main()
