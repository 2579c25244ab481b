from dpotox.cli import main

raise SystemExit(main())
