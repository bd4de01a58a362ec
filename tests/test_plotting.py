import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from jpsdxl.notebook.plotting import bar_compare, missing_glyphs, use_japanese_font  # noqa: E402


def test_japanese_renders_without_tofu():
    family = use_japanese_font()
    text = "かわいすぎる子猫 カタカナ 漢字 ＡＢＣ 1文字あたりのトークン数"
    assert missing_glyphs(text, family) == []
    assert missing_glyphs("😀", family) == ["😀"]  # the check can fail
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns "Glyph ... missing from font(s)" on tofu
        fig, ax = plt.subplots()
        bar_compare(ax, ["猫", "犬"], {"CLIP": [1.0, 2.0], "日本語": [0.5, 0.4]}, title=text)
        fig.canvas.draw()
        plt.close(fig)
