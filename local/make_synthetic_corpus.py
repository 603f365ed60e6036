#!/usr/bin/env python3
"""Make the bundled "Synthetic" speech corpus with espeak-ng and sox.

Real synthesised speech of natural sentences, English and Danish, several voices, speeds and
pitches, written as 16 kHz mono 8-bit FLAC (8-bit keeps the committed corpus under 12 MB) with
one manifest per language and split::

    <out>/<lang>/wav/<ID>.flac
    <out>/<lang>/{train,valid,test}.csv   columns ID,duration,wav,spk_id,wrd,voice,gender

Splits are sentence-disjoint: a sentence (possibly read by several voices) lives in one split.
Everything is drawn from ``random.Random(seed)``, so a re-run with the same seed and the same
espeak-ng/sox versions rewrites the same files.

``en_heldout`` is a held-out English test set for scoring how much a fine-tune forgets of
general English: a fixed list of everyday sentences that no bundled split holds, read by
espeak-ng voice+variant combinations that the bundled corpus does not use, written as
``<out>/en_heldout/test.csv`` and ``<out>/en_heldout/wav/``. It draws from its own
``random.Random`` (seeded with the same ``--seed``), so the en/da draws are untouched; the
script refuses to write it if a sentence or a voice collides with the bundled corpus.

Needs Debian's ``espeak-ng`` and ``sox`` (``apt-get install -y espeak-ng sox``).

Usage::

    python local/make_synthetic_corpus.py --out recipes/Synthetic/data
    python local/make_synthetic_corpus.py --out recipes/Synthetic/data --languages en_heldout
"""

import argparse
import csv
import itertools
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf

# ---------------------------------------------------------------- English sentences
EN_PEOPLE = [
    "the farmer", "the teacher", "my brother", "her sister", "the old man", "a young woman",
    "the doctor", "our neighbor", "the children", "the baker", "his father", "the driver",
]
EN_NAMES = ["anna", "peter", "mary", "james", "lucy", "tom", "sarah", "david", "emma", "john"]
# past-tense verb -> (base form, objects that make sense with it)
EN_VERBS = {
    "carried": ("carry", ["a heavy box", "the old basket", "a small bag", "two chairs",
                          "a bucket of water", "the long ladder"]),
    "bought": ("buy", ["fresh bread", "green apples", "a new coat", "some fresh fish",
                       "a bunch of flowers", "two tickets", "a map of the city"]),
    "read": ("read", ["a long letter", "the morning paper", "a short story", "the old map",
                      "a book about birds"]),
    "painted": ("paint", ["the fence", "the kitchen door", "a small boat", "the garden wall"]),
    "found": ("find", ["a silver key", "an old coin", "a lost dog", "the missing book",
                       "a warm scarf"]),
    "cooked": ("cook", ["dinner", "a pot of soup", "rice and beans", "a big breakfast"]),
    "opened": ("open", ["the window", "the front door", "a wooden box", "the letter"]),
    "cleaned": ("clean", ["the kitchen", "the car", "the windows", "the small room"]),
}
EN_PLACES = [
    "in the garden", "at the market", "near the river", "on the hill", "by the station",
    "in the kitchen", "at the school", "in the park", "on the farm", "at the harbor",
    "in the village", "by the lake",
]
EN_DESTINATIONS = ["market", "river", "station", "school", "park", "harbor", "village", "lake"]
EN_TIMES = [
    "this morning", "last night", "yesterday", "on sunday", "after lunch", "before dinner",
    "in the evening", "last week",
]
EN_PUT = ["put", "leave", "keep"]
EN_THINGS = ["the red cup", "the blue plate", "your coat", "the keys", "the green bottle",
             "this basket"]
EN_SPOTS = ["on the table", "by the door", "in the box", "near the window", "on the shelf"]
EN_STATES = [
    ("soup", ["cold", "warm", "too salty"]), ("room", ["dark", "quiet", "very small"]),
    ("road", ["long", "quiet", "wet"]), ("water", ["cold", "warm", "clear"]),
    ("bread", ["fresh", "still warm"]), ("train", ["late", "full", "very fast"]),
]
EN_WEATHER = ["cold", "warm", "windy", "sunny", "wet", "very dry"]
EN_FIXED = [
    "i would like a cup of tea", "where is the nearest train station",
    "the meeting starts at nine o'clock", "could you open the window please",
    "we are going to the beach tomorrow", "it's too late to call him now",
    "the shop closes at six in the evening", "my phone is on the kitchen table",
    "she has lived in this town for ten years", "don't forget to bring your umbrella",
    "the bus was full so we walked home", "he plays the piano every evening",
    "they built a small house near the forest", "the cat is sleeping on the sofa",
    "we need more milk and some eggs", "the children laughed at the funny clown",
    "turn left at the end of the street", "the library is open until eight",
    "i can't find my glasses anywhere", "the river flows down to the sea",
    "please speak a little more slowly", "the dog barked at the postman",
    "her garden is full of roses", "we watched the sun go down over the hills",
    "the coffee in this cafe is very good", "he wrote a letter to his mother",
    "the lights went out during the storm", "our team won the game on saturday",
    "there is a bird on the roof", "the baby is finally asleep",
]


def english_sentences(rng):
    """Yield grammatical English sentences from a small grammar, forever."""
    verbs = list(EN_VERBS)
    while True:
        kind = rng.random()
        verb = rng.choice(verbs)
        base, objects = EN_VERBS[verb]
        if kind < 0.30:
            yield f"{rng.choice(EN_PEOPLE)} {verb} {rng.choice(objects)} {rng.choice(EN_PLACES)}"
        elif kind < 0.50:
            yield f"{rng.choice(EN_PEOPLE)} {verb} {rng.choice(objects)} {rng.choice(EN_TIMES)}"
        elif kind < 0.62:
            a, b = rng.sample(EN_NAMES, 2)
            yield f"{a} and {b} walked to the {rng.choice(EN_DESTINATIONS)} {rng.choice(EN_TIMES)}"
        elif kind < 0.74:
            yield f"did {rng.choice(EN_PEOPLE)} {base} {rng.choice(objects)} {rng.choice(EN_TIMES)}"
        elif kind < 0.84:
            yield f"please {rng.choice(EN_PUT)} {rng.choice(EN_THINGS)} {rng.choice(EN_SPOTS)}"
        elif kind < 0.95:
            noun, states = rng.choice(EN_STATES)
            yield f"{rng.choice(EN_NAMES)} said that the {noun} was {rng.choice(states)}"
        else:
            yield f"the weather was {rng.choice(EN_WEATHER)} {rng.choice(EN_TIMES)}"


# ---------------------------------------------------------------- Danish sentences
DA_PEOPLE = [
    "den gamle mand", "min søster", "vores nabo", "den lille pige", "læreren", "bageren",
    "fiskeren", "hans bror", "min mor", "børnene", "præsten", "en ung kvinde",
]
DA_NAMES = ["søren", "mette", "jørgen", "åse", "bjørn", "karen", "lars", "hanne"]
DA_VERBS = {
    "køber": ["et frisk brød", "to røde æbler", "en blå kjole", "friske jordbær", "små kager"],
    "spiser": ["et rødt æble", "varm suppe", "frisk fisk", "søde jordbær", "rugbrød med ost"],
    "læser": ["en gammel bog", "avisen", "et langt brev", "en kort historie"],
    "maler": ["det gamle hus", "en lille båd", "døren", "hegnet"],
    "finder": ["en gammel nøgle", "en lille mønt", "den tabte hund", "et kort over øen"],
    "bærer": ["en tung kasse", "en kurv med æg", "to spande vand", "en stor sæk"],
    "sælger": ["grøntsager", "blomster", "varme rundstykker", "røget fisk"],
}
DA_PLACES = [
    "på torvet", "ved søen", "i skoven", "på øen", "ved stranden", "i køkkenet", "på færgen",
    "i haven", "på gården", "ved havnen", "i byen", "på bakken",
]
DA_DESTINATIONS = ["søen", "skolen", "stranden", "havnen", "købmanden", "kirken", "færgen"]
DA_TIMES = ["i dag", "om morgenen", "hver søndag", "i aften", "om foråret", "hver dag",
            "om sommeren", "efter frokost"]
DA_FIXED = [
    "hvad koster det røde æble", "vi ses på fredag", "det regner meget i år",
    "jeg bor på en lille ø", "kan du høre fuglene synge", "hun går en tur ved åen",
    "børnene leger i sneen", "færgen sejler klokken otte", "jeg drikker kaffe med mælk",
    "der står en blå båd på stranden", "han spørger om vejen til byen",
    "vi spiser æbleskiver til jul",
    "min bedstemor bor i århus", "solen skinner over søen", "det er koldt i nørrejylland",
    "katten sover på køkkenbordet", "må jeg få en øl", "han har to søstre og en bror",
]


def danish_sentences(rng):
    """Yield grammatical Danish sentences (rich in æ, ø, å) from a small grammar, forever."""
    verbs = list(DA_VERBS)
    while True:
        kind = rng.random()
        verb = rng.choice(verbs)
        obj = rng.choice(DA_VERBS[verb])
        if kind < 0.35:
            yield f"{rng.choice(DA_PEOPLE)} {verb} {obj} {rng.choice(DA_PLACES)}"
        elif kind < 0.60:
            # Danish main clauses are verb-second: the time phrase pulls the verb before the subject
            yield f"{rng.choice(DA_TIMES)} {verb} {rng.choice(DA_PEOPLE)} {obj}"
        elif kind < 0.80:
            a, b = rng.sample(DA_NAMES, 2)
            yield f"{a} og {b} går ned til {rng.choice(DA_DESTINATIONS)} {rng.choice(DA_TIMES)}"
        else:
            yield f"{rng.choice(DA_NAMES)} {verb} {obj} {rng.choice(DA_TIMES)}"


# ---------------------------------------------------------------- voices
# (espeak-ng voice+variant, gender of the variant)
EN_VOICES = [
    ("en-us+m3", "male"), ("en-us+f2", "female"), ("en-gb+m1", "male"), ("en-gb+f3", "female"),
    ("en-gb-scotland+m4", "male"), ("en-029+f1", "female"), ("en-gb-x-rp+m2", "male"),
    ("en-us+f4", "female"),
]
DA_VOICES = [
    ("da+m1", "male"), ("da+f2", "female"), ("da+m3", "male"), ("da+f3", "female"),
    ("da+m4", "male"), ("da+f1", "female"),
]

# ---------------------------------------------------------------- held-out English test set
# Plain everyday sentences in none of the bundled splits (and not of the grammar's shapes), short
# enough to stay under ~3.6 s at the slowest speed.
EN_HELDOUT_SENTENCES = [
    "can you tell me what time it is", "i usually walk to work when it's sunny",
    "the printer upstairs is broken again", "we should leave before the traffic gets bad",
    "have you ever tried cooking thai food", "my grandmother knits socks for everyone",
    "the dentist says i need to floss more", "if it snows tomorrow the schools will close",
    "he forgot his password for the third time", "these shoes are comfortable but expensive",
    "let's order pizza and watch a movie", "the airport is forty minutes from here",
    "she's learning to play the violin", "why is the microwave making that noise",
    "i'll call you as soon as i get home", "the elevator smells like fresh paint",
    "our flight was delayed by two hours", "could we move the meeting to thursday",
    "the toaster burns every slice of bread", "my laptop battery only lasts three hours",
    "they're going to paint the hallway blue", "whose jacket is hanging behind the door",
    "the pharmacy sells vitamins and cough drops", "i haven't seen that film since i was twelve",
    "you can pay with cash or by card", "the neighbours are having a barbecue on friday",
    "nobody knows where the remote control went", "please send me the photos from the wedding",
    "the plumber will come between one and four", "my sister just adopted a grey kitten",
    "how much does a ticket to london cost", "the tomatoes in our backyard are ripe",
    "i prefer tea in the morning", "the museum is free on the first monday",
    "he's been working from home since march", "turn off the oven when the timer rings",
    "we ran out of toothpaste again", "the new bridge will open next spring",
    "would you rather go hiking or swimming", "my uncle repairs old bicycles in his garage",
    "the hotel room had a view of the mountains", "i think the milk has gone sour",
    "she always sings while she does the dishes", "the parking lot is full on weekends",
    "did anyone water the plants while i was away", "the salad needs a little more pepper",
    "a strong wind knocked over our recycling bin", "i'm saving money for a trip to japan",
    "the receptionist asked me to wait outside", "we'll need a bigger table for the party",
    "his handwriting is almost impossible to read", "the kettle takes ages to boil",
    "they moved to a flat near the university", "my headphones stopped working today",
    "the bakery on the corner opens at seven", "remember to lock the back door tonight",
    "the washing machine leaked all over the floor", "we're expecting thirty guests on sunday",
    "i'd like to return this sweater please", "the football match was cancelled because of rain",
]
# voice+variant combinations that neither bundled language uses; each reads an equal share
EN_HELDOUT_VOICES = [
    ("en-us-nyc+m5", "male"), ("en-gb-x-gbclan+f5", "female"), ("en-gb-x-gbcwmd+m6", "male"),
    ("en-gb-x-rp+f4", "female"), ("en-029+m7", "male"), ("en-gb-scotland+f2", "female"),
]
HELDOUT = "en_heldout"

LANGS = {
    # lang: (generator, fixed sentences, voices, sentences per split, readings per sentence)
    "en": (english_sentences, EN_FIXED, EN_VOICES, {"train": 370, "valid": 60, "test": 60},
           {"train": (1, 2), "valid": (1, 1), "test": (1, 1)}),
    "da": (danish_sentences, DA_FIXED, DA_VOICES, {"train": 180, "valid": 30, "test": 30},
           {"train": (1, 2), "valid": (1, 1), "test": (1, 1)}),
}
SAMPLE_RATE = 16000
VOLUME = 0.4  # sox gain before 8-bit quantisation: lower = smaller files, more quantisation noise
SPEED_WPM = (150, 200)  # espeak-ng -s range, words per minute
PITCH = (25, 75)  # espeak-ng -p range, 0..99


def unique_sentences(gen, fixed, n, rng):
    """Return ``n`` distinct sentences: the fixed ones first, then from the grammar."""
    seen = dict.fromkeys(fixed)
    for sentence in gen:
        if len(seen) >= n:
            break
        seen.setdefault(sentence)
    out = list(seen)[:n]
    rng.shuffle(out)
    return out


def speak(text, voice, speed, pitch, raw_path):
    """espeak-ng's own output (22.05 kHz WAV) for ``text``."""
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(raw_path), text],
        check=True, capture_output=True,
    )


def encode(raw_path, out_path, bits=8):
    """16 kHz mono FLAC at ``bits`` per sample (no dither), silence trimmed, 0.1 s padding."""
    trim = ["silence", "1", "0.02", "0.5%", "reverse", "silence", "1", "0.02", "0.5%", "reverse"]
    subprocess.run(
        ["sox", str(raw_path), "-D", "-r", str(SAMPLE_RATE), "-c", "1", "-b", str(bits),
         str(out_path), "vol", str(VOLUME), *trim, "pad", "0.1", "0.1"],
        check=True, capture_output=True,
    )


def synthesize(text, voice, speed, pitch, out_path, tmp_dir):
    """Speak ``text`` with espeak-ng and write it as the corpus's 8-bit FLAC."""
    raw = Path(tmp_dir) / "raw.wav"
    speak(text, voice, speed, pitch, raw)
    encode(raw, out_path)


def make_language(lang, out_root, seed, limit=None):
    """Write one language's audio and manifests; return the number of utterances per split.

    ``limit`` caps the sentences per split (for tests): the random draws happen in the same order,
    so the first ``limit`` train sentences come out identical to a full run's.
    """
    gen_fn, fixed, voices, n_sent, readings = LANGS[lang]
    rng = random.Random(f"{seed}-{lang}")
    total = sum(n_sent.values())
    sentences = unique_sentences(gen_fn(rng), fixed, total, rng)
    lang_dir = out_root / lang
    if lang_dir.exists():
        shutil.rmtree(lang_dir)
    (lang_dir / "wav").mkdir(parents=True)
    counts = {}
    start = 0
    counter = itertools.count()
    with tempfile.TemporaryDirectory() as tmp:
        for split, n in n_sent.items():
            rows = []
            lo, hi = readings[split]
            for sentence in sentences[start:start + min(n, limit or n)]:
                for voice, gender in rng.sample(voices, rng.randint(lo, hi)):
                    utt_id = f"{lang}_{split}_{next(counter):04d}"
                    path = lang_dir / "wav" / f"{utt_id}.flac"
                    synthesize(sentence, voice, rng.randint(*SPEED_WPM), rng.randint(*PITCH),
                               path, tmp)
                    duration = sf.info(str(path)).duration
                    rows.append({
                        "ID": utt_id, "duration": f"{duration:.3f}",
                        "wav": f"$data_root/{lang}/wav/{utt_id}.flac", "spk_id": voice,
                        "wrd": sentence, "voice": voice, "gender": gender,
                    })
            start += n
            with open(lang_dir / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
            counts[split] = len(rows)
    return counts


def bundled_sentences_and_voices(seed, out_root):
    """Every sentence and voice of the bundled en/da corpus: the ones the grammar draws for
    ``seed`` (all splits, whatever ``--limit``) and those in any manifest already under
    ``out_root``."""
    sentences, voices = set(), set()
    for lang, (gen_fn, fixed, lang_voices, n_sent, _) in LANGS.items():
        rng = random.Random(f"{seed}-{lang}")
        sentences.update(unique_sentences(gen_fn(rng), fixed, sum(n_sent.values()), rng))
        sentences.update(fixed)
        voices.update(v for v, _ in lang_voices)
        for manifest in sorted((out_root / lang).glob("*.csv")):
            with open(manifest, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    sentences.add(row["wrd"])
                    voices.add(row["voice"])
    return sentences, voices


def check_heldout(seed, out_root, sentences=None, voices=None):
    """Raise ``ValueError`` unless the held-out sentences and voices are unique and share nothing
    with the bundled corpus."""
    sentences = EN_HELDOUT_SENTENCES if sentences is None else sentences
    voices = [v for v, _ in EN_HELDOUT_VOICES] if voices is None else voices
    problems = []
    for kind, items in (("sentence", sentences), ("voice", voices)):
        dupes = sorted({x for x in items if items.count(x) > 1})
        if dupes:
            problems.append(f"held-out {kind}(s) listed twice: {dupes}")
    bundled_sentences, bundled_voices = bundled_sentences_and_voices(seed, out_root)
    clash = sorted(set(sentences) & bundled_sentences)
    if clash:
        problems.append(f"held-out sentence(s) also in the bundled corpus: {clash}")
    clash = sorted(set(voices) & bundled_voices)
    if clash:
        problems.append(f"held-out voice(s) also in the bundled corpus: {clash}")
    if problems:
        raise ValueError("; ".join(problems))


def make_heldout(out_root, seed, limit=None):
    """Write the held-out English test set; return its number of utterances.

    One reading per sentence, each voice an equal share. All draws come from the set's own
    ``random.Random`` and happen before any audio is made, so ``limit`` (first sentences only)
    writes files identical to a full run's.
    """
    check_heldout(seed, out_root)
    rng = random.Random(f"{seed}-{HELDOUT}")
    n = len(EN_HELDOUT_SENTENCES)
    assigned = [EN_HELDOUT_VOICES[i % len(EN_HELDOUT_VOICES)] for i in range(n)]
    rng.shuffle(assigned)
    plan = [(sentence, voice, gender, rng.randint(*SPEED_WPM), rng.randint(*PITCH))
            for sentence, (voice, gender) in zip(EN_HELDOUT_SENTENCES, assigned, strict=True)]
    out_dir = out_root / HELDOUT
    if out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "wav").mkdir(parents=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (sentence, voice, gender, speed, pitch) in enumerate(plan[:limit or n]):
            utt_id = f"{HELDOUT}_{i:04d}"
            path = out_dir / "wav" / f"{utt_id}.flac"
            synthesize(sentence, voice, speed, pitch, path, tmp)
            duration = sf.info(str(path)).duration
            rows.append({
                "ID": utt_id, "duration": f"{duration:.3f}",
                "wav": f"$data_root/{HELDOUT}/wav/{utt_id}.flac", "spk_id": voice,
                "wrd": sentence, "voice": voice, "gender": gender,
            })
    with open(out_dir / "test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("recipes/Synthetic/data"))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--languages", nargs="+", default=[*LANGS, HELDOUT],
                        choices=[*LANGS, HELDOUT],
                        help=f"what to (re)write; {HELDOUT} is the held-out English test set")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most this many sentences per split (quick checks)")
    args = parser.parse_args(argv)
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            sys.exit(f"error: `{tool}` not found. Install it: apt-get install -y espeak-ng sox")
    if HELDOUT in args.languages:
        try:
            check_heldout(args.seed, args.out)
        except ValueError as e:
            sys.exit(f"error: {e}")
    for lang in args.languages:
        if lang == HELDOUT:
            continue
        counts = make_language(lang, args.out, args.seed, args.limit)
        size = sum(p.stat().st_size for p in (args.out / lang / "wav").iterdir())
        print(f"{lang}: {counts} utterances, {size / 1e6:.1f} MB of FLAC")
    if HELDOUT in args.languages:
        count = make_heldout(args.out, args.seed, args.limit)
        size = sum(p.stat().st_size for p in (args.out / HELDOUT / "wav").iterdir())
        print(f"{HELDOUT}: {count} utterances, {size / 1e6:.2f} MB of FLAC")


if __name__ == "__main__":
    main()
