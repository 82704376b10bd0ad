# -*- coding: utf-8 -*-
"""Legacy tag normaliser, kept in its original Python 2.7.

params: {"tags": [str, ...], "min_count"?: int}
result: {"tags": [{"tag": str, "count": int}, ...], "dropped": int, "python": "2.7.x"}

This file is genuine Python 2: it cannot even be parsed by Python 3.
"""
import sys
import unicodedata

import workerhost_sdk as sdk


def normalise(tag):
    if not isinstance(tag, basestring):
        raise sdk.PermanentError("every tag must be a string, got %r" % (tag,))
    tag = unicode(tag)
    folded = unicodedata.normalize('NFKD', tag).encode('ascii', 'ignore')
    return '-'.join(folded.lower().replace('_', ' ').split())


def handle(task):
    tags = task.params.get('tags')
    if not isinstance(tags, list):
        raise sdk.PermanentError("params.tags must be a list of strings")
    min_count = int(task.params.get('min_count', 1))
    counts = {}
    with sdk.span('normalise', {'tags': len(tags)}):
        for tag in tags:
            key = normalise(tag)
            if key:
                counts[key] = counts.get(key, 0) + 1
    kept = []
    dropped = 0
    for key, count in sorted(counts.iteritems(), key=lambda kv: (-kv[1], kv[0])):
        if count >= min_count:
            kept.append({'tag': key, 'count': count})
        else:
            dropped += 1
    print >>sys.stderr, "normalised %d tags into %d (%d dropped)" % (len(tags), len(kept), dropped)
    return {'tags': kept, 'dropped': dropped, 'python': sys.version.split()[0]}


if __name__ == '__main__':
    sdk.run(handle)
