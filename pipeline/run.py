"""Entry point placeholder until the pipeline stages land."""
import sys


def main() -> int:
    print("bnnas: the pipeline (python -m pipeline.run) is not built yet; "
          "search_spaces/ is ready to use from Python (see README).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
