from awqflow.cli import main

main()
