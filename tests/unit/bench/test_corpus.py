"""The Python-docs corpus builder: reST clean-up and C4 records."""
from __future__ import annotations

from elas_megatron.bench.corpus import clean_rst, corpus_documents

RST = """\
.. _tut-intro:

.. index::
   single: statement; for

*******************
More Control Flow
*******************

The :keyword:`for` statement calls :func:`~os.open` (see `the docs <https://x>`_) and ``len(x)``.

.. function:: open(file, mode='r')
   :noindex:

   Open *file*.
"""


def test_clean_rst():
    text = clean_rst(RST)
    assert "index" not in text and "tut-intro" not in text and "****" not in text and ":noindex:" not in text
    assert "The for statement calls os.open (see the docs) and len(x)." in text
    assert "open(file, mode='r')" in text and "More Control Flow" in text


def test_corpus_documents(tmp_path):
    (tmp_path / "tutorial").mkdir()
    (tmp_path / "tutorial" / "a.rst.txt").write_text(RST * 3)
    (tmp_path / "b.rst.txt").write_text("too short")
    docs = corpus_documents(tmp_path)
    assert [d["url"] for d in docs] == ["python-docs://3.11/tutorial/a"]
    assert set(docs[0]) == {"text", "timestamp", "url"}
