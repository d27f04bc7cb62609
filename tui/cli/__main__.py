from spkft.tui.cli import main

main()
