from segjointgene.cli import main

raise SystemExit(main())
