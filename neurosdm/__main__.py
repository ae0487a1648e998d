from neurosdm.cli import main

main()
