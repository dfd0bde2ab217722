"""medtextseg: text-guided, semi-supervised medical image segmentation."""

__version__ = "0.1.0"


def build_network(name: str, **options):
    """Build a segmentation network by name; see :func:`medtextseg.nets.build_network`."""
    from medtextseg.nets import build_network as _build

    return _build(name, **options)


def main() -> None:
    """The ``medtextseg`` command. Kept here, light, so that Ctrl-C or SIGTERM while the
    command line itself is still importing gives one line and exit code 130 too."""
    import signal
    import sys

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        from medtextseg.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: stopped before the command started\n")
        sys.exit(130)


__all__ = ["__version__", "build_network", "main"]
