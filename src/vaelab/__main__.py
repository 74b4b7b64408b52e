"""``python -m vaelab``: the ``vaelab`` command."""

from vaelab.cli import run

if __name__ == "__main__":
    run()
