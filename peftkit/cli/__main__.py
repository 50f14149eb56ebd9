from peftkit.cli import main

main()
