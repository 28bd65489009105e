"""``python -m llmkit``: the same entry point as the ``llmkit`` console script."""

from llmkit.cli.app import main

if __name__ == "__main__":
    main()
