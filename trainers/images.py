"""Image helpers shared by sampling and the training loop's validation grids."""

from PIL import Image


def make_grid(images: list[Image.Image], rows: int, cols: int) -> Image.Image:
    """Tile same-size images row by row into one RGB picture, so samples can be compared at a glance."""
    if not images or len(images) != rows * cols:
        raise ValueError(f"make_grid needs rows*cols = {rows * cols} images, got {len(images)}")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise ValueError(f"make_grid needs images of one size; sizes: {sorted({i.size for i in images})}")
    grid = Image.new("RGB", (cols * width, rows * height))
    for k, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((k % cols) * width, (k // cols) * height))
    return grid
