"""Text statistics for an idea-inspiration record: words, sentences, reading time, keywords.

params: {"text": str, "title"?: str, "keywords"?: int (how many, default 8), "wpm"?: int}
"""

import collections
import re

import workerhost_sdk as sdk

WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*", re.UNICODE)
SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his how i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out over
    own same she should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where which while who
    whom why will with would you your yours yourself yourselves""".split()
)


def handle(task):
    text = task.params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise sdk.PermanentError("params.text must be a non-empty string")
    title = task.params.get("title") or ""
    top = int(task.params.get("keywords", 8))
    wpm = int(task.params.get("wpm", 200))
    if top < 0 or wpm <= 0:
        raise sdk.PermanentError("params.keywords must be >= 0 and params.wpm > 0")

    with sdk.span("tokenize", {"characters": len(text)}) as span:
        words = [w.lower() for w in WORD.findall(text)]
        sentences = len(SENTENCE_END.findall(text.strip() + " ")) or 1
        span.set("words", len(words))
    with sdk.span("keywords", {"top": top}):
        # Title words count double: they say what the record is about.
        counted = collections.Counter(w for w in words + [w.lower() for w in WORD.findall(title)] * 2
                                      if w not in STOPWORDS and len(w) > 2)
    sdk.log("text-stats", task=task.id, words=len(words))
    return {
        "words": len(words),
        "unique_words": len(set(words)),
        "sentences": sentences,
        "characters": len(text),
        "avg_words_per_sentence": round(len(words) / sentences, 1),
        "reading_time_seconds": round(len(words) * 60.0 / wpm),
        "keywords": [word for word, _ in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))[:top]],
    }


if __name__ == "__main__":
    sdk.run(handle)
