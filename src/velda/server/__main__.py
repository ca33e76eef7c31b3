from velda.server.main import main

raise SystemExit(main())
