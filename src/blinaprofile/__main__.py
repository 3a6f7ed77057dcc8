from blinaprofile.cli import main

raise SystemExit(main())
