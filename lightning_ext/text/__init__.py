"""Text: WASA's watermark-based source attribution of language-model text, and ReposVul's repository-level
vulnerability data.

WASA (:mod:`~lightning_ext.text.wasa`, :mod:`~lightning_ext.text.watermarked_lm`,
:mod:`~lightning_ext.text.source_attribution`): a small GPT-2 built from a config (transformers; never downloaded)
learns each data provider's invisible Unicode watermark with a separate watermark embedding, head and softmax, then
embeds it in generated text or regenerates it after any text to name the source; the providers are offline text
(Debian fortunes-min, GCIDE, CPython's pydoc topics, or the user's files), tokenized by characters so each watermark
character stays one token. ReposVul (:mod:`~lightning_ext.text.repos_vul`, :mod:`~lightning_ext.text.vulnerability_data`):
a local dataset in ReposVul's schema as function/file vulnerability detection, CWE classification or repair pairs,
split by project or by commit time; nothing is downloaded. :mod:`~lightning_ext.text.debian_patches` turns real CVE
patch files (Debian ``debian/patches/CVE-*``, git format-patch) into records of that schema.

transformers comes with the ``[text]`` extra: ``pip install "lightning-ext[text]"`` (only the language model needs
it; the DataModules do not).
"""
