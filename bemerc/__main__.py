from bemerc.cli import main

main()
