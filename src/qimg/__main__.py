from qimg.cli.main import main

raise SystemExit(main())
