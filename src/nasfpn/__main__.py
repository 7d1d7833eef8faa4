from nasfpn.cli import main

raise SystemExit(main())
