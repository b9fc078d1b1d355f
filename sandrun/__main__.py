from sandrun.cli import main

main()
