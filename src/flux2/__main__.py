from flux2.cli import main

raise SystemExit(main())
