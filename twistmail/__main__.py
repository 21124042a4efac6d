"""``python -m twistmail``: the same as the ``twistmail`` command."""

from ._heap import hold


def main() -> None:
    """Run the ``twistmail`` command on ``sys.argv``, collecting nothing while it starts."""
    hold()
    from .cli import main as command

    command()


if __name__ == "__main__":
    main()
