from cnnkit.cli.app import main

main()
