from hubmerge.cli.app import main

main()
