from mae.cli import main

raise SystemExit(main())
