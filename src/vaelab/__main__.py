"""``python -m vaelab``: the ``vaelab`` command."""

from vaelab.cli.app import run

if __name__ == "__main__":
    run()
