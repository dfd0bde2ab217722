"""medtextseg: text-guided, semi-supervised medical image segmentation."""

__version__ = "0.1.0"


def build_network(name: str, **options):
    """Build a segmentation network by name; see :func:`medtextseg.nets.build_network`."""
    from medtextseg.nets import build_network as _build

    return _build(name, **options)


__all__ = ["__version__", "build_network"]
