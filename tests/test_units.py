import pytest

from qimg.block.options import format_help, split_options
from qimg.formats.raw import RawDriver
from qimg.units import parse_size, size_to_str


@pytest.mark.parametrize("val,text", [
    (0, "0 B"), (512, "512 B"), (1000, "0.977 KiB"), (1024, "1 KiB"),
    (335872, "328 KiB"), (1 << 30, "1 GiB"), (2580000, "2.46 MiB"),
])
def test_size_to_str(val, text):
    assert size_to_str(val) == text


@pytest.mark.parametrize("text,val", [("1M", 1 << 20), ("1.5k", 1536), ("512b", 512), ("10", 10), ("2E", 2 << 60)])
def test_parse_size(text, val):
    assert parse_size(text) == val


@pytest.mark.parametrize("text", ["", "12x", "-5", "1.5", "16E"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_split_options_escapes_commas():
    assert split_options("a=1,b=x,,y,help") == [("a", "1"), ("b", "x,y"), ("help", None)]


def test_help_layout():
    text = format_help(RawDriver.create_opts)
    assert "  size=<size>            - Virtual disk size\n" in text
    assert "  nocow=<bool (on/off)>  - Turn off" in text
