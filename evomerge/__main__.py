from evomerge.service.cli import main

raise SystemExit(main())
