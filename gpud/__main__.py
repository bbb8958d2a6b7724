"""`python -m gpud` runs the CLI."""

from gpud.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
