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


def test_judged_grid_frames_each_image_by_the_judges_marks():
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import to_hex

    from jpsdxl.notebook.plotting import judged_grid

    images = {"a": np.zeros((3, 8, 8, 3), np.uint8), "b": np.zeros((3, 8, 8, 3), np.uint8)}
    marks = {"a": [(True, True), (True, False), (False, False)], "b": [(False, True)] * 3}
    fig = judged_grid(images, marks, ["赤い丸", "青い四角", "三角形で緑色の図形"])
    axes = np.array(fig.axes).reshape(2, 3)
    assert [[to_hex(ax.spines["top"].get_edgecolor()) for ax in row] for row in axes] == [
        ["#1a9850", "#fdae61", "#d73027"], ["#fdae61"] * 3]
    assert axes[0][0].get_ylabel() == "a\n1/3" and axes[1][0].get_ylabel() == "b\n0/3"
    assert axes[0][0].get_title() == "赤い丸" and axes[0][2].get_title() == "三角形で\n緑色の図形"  # long: two lines
    plt.close(fig)


def test_judged_grid_puts_each_kind_of_prompt_in_its_own_labelled_panel():
    import matplotlib.pyplot as plt
    import numpy as np

    from jpsdxl.notebook.plotting import judged_grid

    images = {"m": np.zeros((3, 8, 8, 3), np.uint8)}
    marks = {"m": [(True, True), (False, False), (True, True)]}
    fig = judged_grid(images, marks, ["p0", "p1", "p2"], groups=["new", "old", "new"])
    assert [sub.get_suptitle() for sub in fig.subfigs] == ["new (2 captions)", "old (1 caption)"]
    first, second = ([ax for ax in sub.axes if ax.axison] for sub in fig.subfigs)
    assert [ax.get_title() for ax in first] == ["p0", "p2"] and [ax.get_title() for ax in second] == ["p1"]
    assert first[0].get_ylabel() == "m\n2/2" and second[0].get_ylabel() == "m\n0/1"
    plt.close(fig)


def test_training_curves_draw_the_seeds_mean_and_shade_their_range():
    import matplotlib.pyplot as plt

    from jpsdxl.notebook.plotting import training_curves

    run = lambda *v: [{"step": s, "eval_loss": x} for s, x in zip((0, 50, 100), v)]  # noqa: E731
    fig = training_curves({"one": run(1.0, 0.5, 0.4), "three": [run(1.0, 0.6, 0.3), run(1.0, 0.4, 0.5),
                                                                run(1.0, 0.5, 0.4)]}, keys=("eval_loss",))
    ax = fig.axes[0]
    assert [[round(y, 6) for y in line.get_ydata()] for line in ax.lines] == [[1.0, 0.5, 0.4], [1.0, 0.5, 0.4]]
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # the shaded range of the three seeds only
    assert len(ax.collections) == 1 and min(band) == 0.3 and max(band) == 1.0 and 0.6 in band
    assert ax.get_legend_handles_labels()[1] == ["one", "three (mean of 3 seeds)"]
    plt.close(fig)


def test_the_demo_grid_has_a_row_per_model_and_a_column_per_demo_prompt():
    from types import SimpleNamespace

    import numpy as np

    from jpsdxl.notebook.plotting import demo_grid

    use_japanese_font()
    prompts = [SimpleNamespace(ja="猫", en="a cat", demo=True), SimpleNamespace(ja="犬", en="a dog", demo=False),
               SimpleNamespace(ja="鳥居", en="a torii", demo=True)]
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph (a tofu box) is a warning: an error here
        fig = demo_grid({"prompts": prompts, "demo": {"English (original)": images, "distilled": images}})
        fig.canvas.draw()
    titles = [ax.get_title() for ax in fig.axes]
    assert len(fig.axes) == 4 and titles == ["English (original)\na cat", "English (original)\na torii",
                                             "distilled\n猫", "distilled\n鳥居"]
    plt.close(fig)
