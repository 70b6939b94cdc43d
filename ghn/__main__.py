from ghn.cli import main

main()
