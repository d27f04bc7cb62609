from spkft.tui.wizard import main

main()
