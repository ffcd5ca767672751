from segjointgene.cli import main

if __name__ == "__main__":  # the guard lets Dask and torch worker processes start by spawning
    raise SystemExit(main())
