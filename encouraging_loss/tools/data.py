"""The project's test and benchmark data: where it is, what it must hash to, how to fetch it.

The tests and the small benchmarks read public data laid out as
``<root>/<dataset>/<file>`` (``iwslt14-de-en/valid.de.gz``, ``mnist/...``): IWSLT14
De-En and IWSLT17 Fr-En (the paper's translation experiments), MNIST and
Fashion-MNIST (its image and OOD experiments) and Multi30k. :data:`FILES` lists
every file with its size, sha256, public source(s) and how it is made from them;
the values are those of ``shared/data/MANIFEST.md``.

    el-data fetch                      # everything, into the cache
    el-data fetch --only mnist         # one dataset
    el-data fetch --from ../shared/data  # copy a local mirror
    el-data verify                     # check the cache
    el-data where                      # where the tests look

The cache is ``$EL_DATA``, else ``$XDG_CACHE_HOME/encouraging-loss/data``, else
``~/.cache/encouraging-loss/data``. The tests look, in this order, in
``$EL_SHARED_DATA``, ``../shared/data`` beside the checkout and the cache, and use
the first that holds every file, each matching its hashes (:func:`find_data`); a
complete but corrupt copy is passed over and named, with the command that repairs
it. So that this costs only ``stat`` calls after the first time, each file that was
hashed is remembered in :func:`verify_cache_file` with its absolute path, size,
mtime, inode and ctime: a file changed in any way that shows in those is hashed
again (a damaged or unreadable cache file is ignored and rewritten).

Verification. A file that upstream publishes as ``.gz`` (MNIST, Fashion-MNIST, the
official Multi30k files) is copied byte for byte and must match its stored sha256.
Every other file is ``gzip -n -9`` of a plain-text file that is either an upstream
file as it is or derived from upstream files (BPE markers removed, ``<seg>`` texts
of WIT3 XML files). Python's gzip does not write GNU gzip's bytes, so such a file,
once fetched, is checked by the sha256 of its **uncompressed content**
(``raw_sha256``); a copy of the stored file passes either way. Downloads go to
``<file>.part`` (resumed with an HTTP Range request when rerun) and are renamed to
their final name only once verified; a file that fails is removed and named, with
the expected and the actual hash.

Network. A connection gets 10 s (``--connect-timeout``), a connected server 30 s
without a byte (``--stall-timeout``); a running download prints its bytes, total
and rate on stderr every 3 s. A server that fails 2 connection attempts in a
row is taken as unreachable: its other URLs are skipped and files fall back to
their other sources; when every server the files need is unreachable, fetch
stops with one line (the network is unreachable: use ``--from DIR``). A
destination that cannot be written (read-only, full) stops it with one line
``cannot write <path>: <reason>``; only a partial download stays, as ``*.part``.
"""
import argparse
import contextlib
import functools
import gzip
import hashlib
import html
import http.client
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from .cli import Parser
from .files import FileProblem, os_error_line, read_json, write_json

__all__ = [
    "DATASETS", "FETCH_COMMAND", "FILES", "DataError", "DataFile", "Part", "cache_dir", "check_dir", "check_file",
    "data_dirs", "derive", "fetch", "find_data", "main", "missing_data_message", "missing_files",
    "repair_command", "require_data", "verify", "verify_cache_file",
]

FETCH_COMMAND = "el-data fetch"
CHUNK = 1 << 20


class DataError(Exception):
    """A file that cannot be fetched or does not verify; the message is one line naming it."""


@dataclass(frozen=True)
class Part:
    """One upstream file a data file is made from: its download name, URLs (tried in order), tar member."""

    name: str
    urls: Tuple[str, ...]
    member: str = ""


@dataclass(frozen=True)
class DataFile:
    """One file of the data, as stored in ``shared/data`` (see MANIFEST.md there).

    ``how`` says how it is made from its ``parts``: ``copy`` (byte for byte),
    ``text`` (the parts' text concatenated, then gzipped), ``unbpe`` (subword-nmt
    ``@@`` markers removed), ``segs`` (the ``<seg>`` texts of WIT3 XML files,
    unescaped and whitespace-collapsed), ``text-trim`` (trailing empty lines
    dropped). Only ``copy`` files keep their stored sha256 when fetched; the others
    are checked by ``raw_sha256``.
    """

    dataset: str
    name: str
    size: int
    sha256: str
    raw_sha256: str
    how: str
    parts: Tuple[Part, ...]
    note: str = ""

    @property
    def path(self) -> str:
        return f"{self.dataset}/{self.name}"

    @property
    def source(self) -> str:
        """The first URL of every part, for messages."""
        return " + ".join(p.urls[0] + (f" [{p.member}]" if p.member else "") for p in self.parts)


def _gh(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


# --- sources (commits and paths as recorded in shared/data/MANIFEST.md) -----------------------------
_JT, _JT_DATA, _JT_SAMPLE = ("johntzwei/nmt_iwslt", "663fc3e8dfc9a87e276323a18fd271e7a8dfc5ed",
                             "7750e75a0379bacdc3ad2f49da883116a69b3691")
_FS, _FS_PR, _FS_ORIG = ("facebookresearch/fairseq", "5f7bc3f600a664839e2a288a5c36c8ef6668ee19",
                         "b3f176a4775c4bd0c58a789a1fad52435ee9834c")
_WIT, _WIT_C = "hlt-mt/WIT3", "e43615b79232e9cc0fccc76d90fd1c658146d29d"
_GEC, _GEC_C, _GEC_DATA = ("HAOzj/GEC", "8f1d261d22c6a667f26a0d26a5e3c715d250e046",
                           "134a9a8b3151d20d4292365964d104fba04dc739")
_LJ, _LJ_C = "lijie2020/vae", "6aa58aba724f46dba967fc7058945941d171d433"
_ZA, _ZA_C = "zalandoresearch/fashion-mnist", "b2617bb6d3ffa2e429640350f613e3291e10b141"
_M3, _M3_C = "multi30k/dataset", "a3d2e0d26b56f3846f66a952536ffed4e401d05a"
_AT, _AT_C = "jadore801120/attention-is-all-you-need-pytorch", "08b4ac2b9a9dc99f0d186ad17ba622be8e1f6b07"
_RC, _RC_C = "robertocarlosmedina/attention-transformer-translator-1", "30c44fc8b38091627221ef4fd385caeb6bfea75c"
_IWSLT14_TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
                      "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012")
_SAMPLE_NOTE = ("a random sample (shuf, no seed) of the fairseq train set: it cannot be re-derived from the "
                "IWSLT14 archive, its only source is the upstream copy; if that is gone, copy it from a "
                "checkout's ../shared/data with --from")


def _iwslt14(name, size, sha, raw, how, parts, note=""):
    return DataFile("iwslt14-de-en", name, size, sha, raw, how, tuple(parts), note)


def _tok14(upstream: str) -> Part:
    return Part(upstream.rsplit("/", 1)[-1], (_gh(_JT, _JT_DATA, f"iwslt14.tokenized.de-en/{upstream}"),
                           _gh(_FS, _FS_PR, f"examples/translation/iwslt14.tokenized.de-en/{upstream}")))


def _raw14(lang: str) -> List[Part]:
    parts = []
    for s in _IWSLT14_TEST_SETS:
        path = f"examples/translation/orig/de-en/{s}.de-en.{lang}.xml"
        parts.append(Part(f"{s}.de-en.{lang}.xml", (_gh(_FS, _FS_PR, path), _gh(_FS, _FS_ORIG, path))))
    return parts


def _sample14(lang: str) -> Part:
    return Part(f"train.{lang}.bpe", (_gh(_JT, _JT_SAMPLE, f"iwslt14.tokenized.de-en/lr_samples/first/train.{lang}"),))


def _iwslt17(name, size, sha, raw, parts):
    return DataFile("iwslt17-fr-en", name, size, sha, raw, "segs", tuple(parts))


def _wit3(year: str, lang: str) -> Part:
    pair = "fr-en" if lang == "fr" else "en-fr"
    src, tgt = pair.split("-")
    return Part(f"{pair}.tgz", (_gh(_WIT, _WIT_C, f"archive/2017-01-ted-test/texts/{src}/{tgt}/{pair}.tgz"),),
                member=f"{pair}/IWSLT17.TED.tst{year}.{pair}.{lang}.xml")


def _iwslt16(setname: str, lang: str) -> Part:
    path = f".data/iwslt/fr-en/IWSLT16.TED.{setname}.fr-en.{lang}.xml"
    return Part(f"IWSLT16.TED.{setname}.fr-en.{lang}.xml", (_gh(_GEC, _GEC_C, path), _gh(_GEC, _GEC_DATA, path)))


def _mnist(name, size, sha, raw):
    return DataFile("mnist", name, size, sha, raw, "copy", (Part(name, (
        _gh(_LJ, _LJ_C, f"data/MNIST/MNIST/raw/{name}"), f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}")),))


def _fashion(name, size, sha, raw):
    return DataFile("fashion-mnist", name, size, sha, raw, "copy", (Part(name, (
        _gh(_ZA, _ZA_C, f"data/fashion/{name}"), f"http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/{name}")),))


def _m30k(name, upstream, size, sha, raw):
    return DataFile("multi30k-de-en", name, size, sha, raw, "copy",
                    (Part(name, (_gh(_M3, _M3_C, f"data/task1/raw/{upstream}"),)),))


FILES: Tuple[DataFile, ...] = (
    # IWSLT14 De-En: fairseq prepare-iwslt14.sh output (tokenized, lowercased, before BPE)
    _iwslt14("valid.de.gz", 298904, "b1da9c6171df1ef72cd06dae66197e326bc63ec3d23cf6dc4340b419b6e5ac47",
             "3f051579c9d8c7281a6ea8c72ad4ae09dbaa9bb24dfd41166f2c3a3df7cd940a", "text", [_tok14("tmp/valid.de")]),
    _iwslt14("valid.en.gz", 272243, "ac59d064bb5832c71e0c0dd28c63fb70a1dd585312db134fdcf63ab450749397",
             "e6d7317a9772cd1ed970910c611e9e7dada1f34439269b44a9d801334bff948d", "text", [_tok14("tmp/valid.en")]),
    _iwslt14("test.de.gz", 243584, "fc73c9a37732d08c8f9218f1fbabe6eb0d6bae183b0d2efa5e5a8f28dbe530c8",
             "e718c783e33160b7d72af8f733756a466e0d0c016eff8ab624c1b0d1d01cbbdf", "text", [_tok14("tmp/test.de")]),
    _iwslt14("test.en.gz", 219348, "f4a8cd543199bc7df41caf5c0a3d359bb0db367280fdbdae6140fd53a628005f",
             "4b127beb9050511a3e6209cd837ff36f623a3a423666b32aba6e208b7330cf4c", "text", [_tok14("tmp/test.en")]),
    _iwslt14("test.raw.de.gz", 251582, "8472f9a8a5bc480a7ee9ef776401805e68fb9ea095d2110d1cd2f1f9b8e6a24f",
             "6ef297172278da8c990b7986a232544af200bbc2f0a2f2b7d076c7a928d40f5e", "segs", _raw14("de")),
    _iwslt14("test.raw.en.gz", 221119, "243ce4cca3b8eca6f1a056804082074e717d02180c27aa698eaa09d89c06f025",
             "45bc423844f15761ed4c20bc716047bb52dc2fe3afb7d8bfc1495c959703a515", "segs", _raw14("en")),
    _iwslt14("code.gz", 37776, "3c1b4aaac469aa6de73368f1191ee6fa6c2e5653509722837babd6f956994a68",
             "3dd02684b6693abce3ba59520425901b0b910abeec2ae6b15cc62e458441d503", "text", [_tok14("code")]),
    _iwslt14("train-sample.de.gz", 194181, "858ed9595a5f9fa94046f1ddaebdd3f2d593046ea61bd740102abf460132c32e",
             "7951bdd2a3ba41401bb47d9f06ec9d536a8083c304f89f32c9477408b2294621", "unbpe", [_sample14("de")],
             _SAMPLE_NOTE),
    _iwslt14("train-sample.en.gz", 176985, "31bba1d97d6d675ccaa7ecdb18f39159c43ffa80baffd284665f2991f35cc737",
             "a6f0e0023229f216cf19603792572f25edde54a935f872a9241666dca6730dbb", "unbpe", [_sample14("en")],
             _SAMPLE_NOTE),
    # IWSLT17 Fr-En: raw text of the official XML (IWSLT17 test sets from WIT3, IWSLT16 dev/tst via torchtext)
    _iwslt17("test.fr.gz", 53086, "f888edfc2086bdb4a00e1df29c0873b357de1fcabdd57da340d9dea1ad8eb1c8",
             "90a821eb67015d5fdfdf35995ce8e5c7e00553ca688c9756b4f4daa720305568", [_wit3("2017", "fr")]),
    _iwslt17("test.en.gz", 49822, "e91bb1cb74fe16cc21d5c78a774ed3bedc44578f6abb13c3112c8ca19c3ae9fc",
             "bbc7133c90c9f91f665d26f4c369035cc31b34dae961969470130271ad87b9f0", [_wit3("2017", "en")]),
    _iwslt17("tst2016.fr.gz", 45611, "5b66158f6a30a13606f4676b57e36f468d2a722a03d0817879a57ade98bbad46",
             "41c93bcd854d30457a8f4dd2f17509e84d726874861f5a6a7d955026f8e7d07e", [_wit3("2016", "fr")]),
    _iwslt17("tst2016.en.gz", 42421, "32cc741e576ef71f07c48e5e5e089bbef80978a5b7f7dfd2af40763515e733fa",
             "780c896dc0b70cc8805d825132a541ac1966c087b22c144bd32a03b40eee8624", [_wit3("2016", "en")]),
    _iwslt17("valid.fr.gz", 38178, "54820fc6144db9a3bcfd7890163c00e9d781d3cc7096d259ca6ddb602006b8a3",
             "32643f4df01f8d700d3ce133af5298d48dbb1743826afacbce1b6143f951aabb", [_iwslt16("dev2010", "fr")]),
    _iwslt17("valid.en.gz", 36296, "69bca1415dcd046e019cc1b5339c3bcac185e06d059fd16d8e69b48dc7cd78b9",
             "56989441a1a503e0718a592b31a152b944bfd707d1ee1f9305de8caf88ce9e60", [_iwslt16("dev2010", "en")]),
    _iwslt17("iwslt16.tst2010.fr.gz", 59264, "0120d95df7d0270f162a6d628133d59da6461eadce780a67682162f396c65886",
             "e9b2007a2ce3007b5c749a62bdeb97fd1a2779a6f4786def175ba3b7fae51664", [_iwslt16("tst2010", "fr")]),
    _iwslt17("iwslt16.tst2010.en.gz", 53081, "9ccda0765da02d7a5ff0543edfa2186847efde57cd0a03c1a55672c644ee0136",
             "fd8ec76064786ffb21195b9ead39c9f31d51e0b36d4d1b455cfe39a4f2c12e5d", [_iwslt16("tst2010", "en")]),
    _iwslt17("iwslt16.tst2011.fr.gz", 28669, "98eec93b97e1d154a8339ca6ccfb366217f415d9605b9b254da0fe42fb151411",
             "e045f6e0619c5ec43ce6ce63fc14fa8ac33921a9bf8dcacda359e6e4c1a348f0", [_iwslt16("tst2011", "fr")]),
    _iwslt17("iwslt16.tst2011.en.gz", 25606, "fccb3ec618233b062d3780c556263d50ac49648414b6dca130b872db8a5f8552",
             "2cdf614d54cb1f3d8b36b92f227cd2a5484201c2f3b0140805a3fff8ce4c20fd", [_iwslt16("tst2011", "en")]),
    _iwslt17("iwslt16.tst2012.fr.gz", 41989, "13ed69e3d53fd9fa5bee7a445c6cccce7453bf80361a48bc93c72133bf12db6e",
             "441566055095747dc11f30de9f66cf8631cb96db912ee0c69d79b2fc4de7aaa8", [_iwslt16("tst2012", "fr")]),
    _iwslt17("iwslt16.tst2012.en.gz", 37444, "dd937d8d96373282b3b4c24c99ec7b11e78cb4934d1c242f2a7675dd0107aad1",
             "1edb77f35bd20919d69434b7ff465740d5dc8b81e41ebdb0946348e4090d1650", [_iwslt16("tst2012", "en")]),
    _iwslt17("iwslt16.tst2013.fr.gz", 42432, "c1e017f59471989ee455f97bbb5e3ff4cbf995a3f1be9ddacacc77155cf18530",
             "420f2bf49eb76e43d56b18dbc87b08803dacbb4ce8e6b3b65bf6364753e01b2f", [_iwslt16("tst2013", "fr")]),
    _iwslt17("iwslt16.tst2013.en.gz", 38055, "a293f5b2172e5ebfc1886863a1f6a2d58188ea40fe514efebe126389fdde0d15",
             "a52b264b8d6b5c01c39dad436a74bd856b28c0f3a69b255950aecba9d4602c41", [_iwslt16("tst2013", "en")]),
    _iwslt17("iwslt16.tst2014.fr.gz", 50534, "ee5cf79512c8a1dd31fae89fbd7fd84da690b0d3377f82139f63c908937ea0dd",
             "c85d38c6a1dd8ef1916783835a4e5781db1ad519424d9966c8ce67adab0f2344", [_iwslt16("tst2014", "fr")]),
    _iwslt17("iwslt16.tst2014.en.gz", 44704, "845d64f37b180add5e6c906e3eeb43dca7c2081e2c1913dfc15754ed6ee31f9b",
             "e82bfa58d4a170573826999a4852c496162a229f405eb488b3d6d385dbabcbaa", [_iwslt16("tst2014", "en")]),
    # MNIST and Fashion-MNIST: the original distribution files, byte for byte
    _mnist("train-images-idx3-ubyte.gz", 9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
           "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    _mnist("train-labels-idx1-ubyte.gz", 28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
           "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    _mnist("t10k-images-idx3-ubyte.gz", 1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
           "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    _mnist("t10k-labels-idx1-ubyte.gz", 4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
           "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    _fashion("train-images-idx3-ubyte.gz", 26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
             "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    _fashion("train-labels-idx1-ubyte.gz", 29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
             "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    _fashion("t10k-images-idx3-ubyte.gz", 4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
             "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    _fashion("t10k-labels-idx1-ubyte.gz", 5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
             "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    # Multi30k De-En: the official .gz files, byte for byte, plus the two WMT16 German variants
    _m30k("train.de.gz", "train.de.gz", 637044, "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
          "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72"),
    _m30k("train.en.gz", "train.en.gz", 568929, "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
          "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6"),
    _m30k("valid.de.gz", "val.de.gz", 24681, "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
          "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660"),
    _m30k("valid.en.gz", "val.en.gz", 21650, "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
          "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227"),
    _m30k("test2016.de.gz", "test_2016_flickr.de.gz", 22890,
          "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
          "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16"),
    _m30k("test2016.en.gz", "test_2016_flickr.en.gz", 21077,
          "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
          "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182"),
    _m30k("test_2017_flickr.de.gz", "test_2017_flickr.de.gz", 21471,
          "a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee",
          "c3078bc3b36808bf9d20eb2347ed6137016179ef59ec0d2b9b8ecc3fb2880081"),
    _m30k("test_2017_flickr.en.gz", "test_2017_flickr.en.gz", 19138,
          "76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074",
          "ce1450ddc5ab0834502579d77a170849952e15a2938b34cc503bdc25ebb4fb98"),
    DataFile("multi30k-de-en", "valid.wmt16.de.gz", 24375,
             "360ba88fc93e95b955924779cf9e31499341b16f56ee172b9ece99a40ff0a56f",
             "366863c09b91e91c100bc87501a85fe1ce49270c2301de46d39075aee5ce8021", "text-trim",
             (Part("val.de", (_gh(_AT, _AT_C, "data/multi30k/val.de"), _gh(_RC, _RC_C, ".data/multi30k/val.de"))),),
             "upstream val.de ends with one empty line, dropped here"),
    DataFile("multi30k-de-en", "test2016.wmt16.de.gz", 22598,
             "ecdf99cbb9b0ec4d73f5708e974d6c389f480e7eca1eb2a1528ddc5c2a7c548c",
             "c1d2f544471a7387e37d15f1adf075ff7d6fe57a30840bb969281ae102d24cb1", "text",
             (Part("test.de", (_gh(_AT, _AT_C, "data/multi30k/test.de"),)),)),
)

DATASETS: Tuple[str, ...] = tuple(dict.fromkeys(f.dataset for f in FILES))

# --- where the data is ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The download cache: ``$EL_DATA``, else ``$XDG_CACHE_HOME/encouraging-loss/data``, else ``~/.cache/...``.

    Tooling for the data of the paper's experiments (no equation).
    """
    if os.environ.get("EL_DATA"):
        return Path(os.environ["EL_DATA"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "encouraging-loss" / "data"


def data_dirs(checkout: Optional[Path] = None) -> List[Tuple[str, Path]]:
    """Where the tests look for data, in order: ``$EL_SHARED_DATA`` (if set), ``../shared/data``, the cache.

    ``checkout`` is the repository root (default: the one holding this package).
    Tooling, no equation.
    """
    checkout = Path(checkout) if checkout is not None else Path(__file__).resolve().parents[1]
    dirs = []
    if os.environ.get("EL_SHARED_DATA"):
        dirs.append(("$EL_SHARED_DATA", Path(os.environ["EL_SHARED_DATA"]).expanduser()))
    dirs.append(("../shared/data", checkout.parent / "shared" / "data"))
    dirs.append(("cache", cache_dir()))
    return dirs


def _select(datasets: Optional[Iterable[str]]) -> List[DataFile]:
    if not datasets:
        return list(FILES)
    wanted = list(datasets)
    unknown = [d for d in wanted if d not in DATASETS]
    if unknown:
        raise DataError(f"unknown dataset {unknown[0]!r}; known: {', '.join(DATASETS)}")
    return [f for f in FILES if f.dataset in wanted]


def missing_files(root: Path, datasets: Optional[Iterable[str]] = None) -> List[DataFile]:
    """The files of ``datasets`` (default all) that are not present under ``root`` (presence only, no hashing)."""
    root = Path(root)
    return [f for f in _select(datasets) if not (root / f.dataset / f.name).is_file()]


def verify_cache_file() -> Path:
    """Where the lookup remembers which files it has hashed: ``$EL_VERIFY_CACHE``, else
    ``verified.json`` beside the default data cache (``$XDG_CACHE_HOME/encouraging-loss/``, else
    ``~/.cache/encouraging-loss/``). Tooling, no equation."""
    if os.environ.get("EL_VERIFY_CACHE"):
        return Path(os.environ["EL_VERIFY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "encouraging-loss" / "verified.json"


_CACHE_VERSION = 1
_CACHE_MAX_BYTES = 8 << 20  # a larger file is not ours: ignored (and replaced on the next save)
_CACHE_MAX_ENTRIES = 4000


def _signature(st: os.stat_result) -> List[int]:
    # size and mtime as the user sees them, plus inode and ctime: a file replaced by a rename, or
    # edited with its mtime set back (os.utime, cp -p, tar), still gets hashed again.
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class _Checks:
    """:func:`check_file` with a memory of earlier results: a file whose absolute path, size, mtime,
    inode and ctime are those it had when it was last hashed against the same expected hashes is
    not read again. The memory is :func:`verify_cache_file`; an unreadable, damaged or foreign
    file there is ignored (and replaced), a folder where it cannot be written only costs speed."""

    def __init__(self):
        self.path = verify_cache_file()
        self.known: Dict[str, dict] = self._load()
        self.fresh: Dict[str, dict] = {}
        self.hashed = self.cached = 0

    def _load(self) -> Dict[str, dict]:
        try:
            if self.path.stat().st_size > _CACHE_MAX_BYTES:
                return {}
            value = read_json(self.path, "verified-files cache")
        except (OSError, FileProblem):
            return {}
        files = value.get("files") if value.get("version") == _CACHE_VERSION else None
        return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}

    def check(self, entry: DataFile, path: Path) -> str:
        """``check_file(entry, path)``, from memory when the file has not changed since it was hashed."""
        try:
            st = os.stat(path)
        except OSError:
            return "missing"
        if not stat.S_ISREG(st.st_mode):
            return "missing"
        key, sig, expect = os.path.abspath(path), _signature(st), f"{entry.sha256}:{entry.raw_sha256}"
        rec = self.fresh.get(key) or self.known.get(key)
        if rec and rec.get("stat") == sig and rec.get("expect") == expect and isinstance(rec.get("problem"), str):
            self.cached += 1
            return rec["problem"]
        problem = check_file(entry, path)
        self.hashed += 1
        self.remember(path, entry, problem, st)
        return problem

    def remember(self, path: Path, entry: DataFile, problem: str, st: Optional[os.stat_result] = None) -> None:
        """Record a result just computed (``st``: the file's stat taken before it was hashed); a file that
        vanished or could not be read is not remembered."""
        if problem == "missing" or problem.startswith("unreadable"):
            return
        try:
            st = st if st is not None else os.stat(path)
        except OSError:
            return
        self.fresh[os.path.abspath(path)] = {"stat": _signature(st), "expect": f"{entry.sha256}:{entry.raw_sha256}",
                                             "problem": problem}

    def dir(self, root: Path, datasets: Optional[Iterable[str]] = None
            ) -> Tuple[List[DataFile], List[Tuple[DataFile, str]]]:
        missing, corrupt = [], []
        for f in _select(datasets):
            problem = self.check(f, Path(root) / f.dataset / f.name)
            if problem == "missing":
                missing.append(f)
            elif problem:
                corrupt.append((f, problem))
        return missing, corrupt

    def save(self) -> None:
        """Merge what was learnt into the cache file (atomically); entries of vanished files are dropped."""
        if not self.fresh:
            return
        merged = dict(self._load())  # another process may have saved since we read it
        merged.update(self.fresh)
        for key in list(merged):
            if key not in self.fresh and not os.path.isfile(key):
                del merged[key]
        if len(merged) > _CACHE_MAX_ENTRIES:
            merged = dict(list(merged.items())[-_CACHE_MAX_ENTRIES:])
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.path, {"version": _CACHE_VERSION, "files": merged}, indent=0)
        except (OSError, ValueError):
            pass  # a read-only or full cache folder: the next lookup hashes again, nothing else changes
        self.fresh = {}

    def __enter__(self) -> "_Checks":
        return self

    def __exit__(self, *exc) -> None:
        self.save()


def check_dir(root: Path, datasets: Optional[Iterable[str]] = None
              ) -> Tuple[List[DataFile], List[Tuple[DataFile, str]]]:
    """``(missing, corrupt)`` for the files of ``datasets`` (default all) under ``root``: each present file is
    checked against its hashes (:func:`check_file`), unless :func:`verify_cache_file` records that it verified
    with the same path, size, mtime, inode and ctime, so a second lookup costs only ``stat`` calls."""
    with _Checks() as checks:
        return checks.dir(root, datasets)


def find_data(datasets: Optional[Iterable[str]] = None, checkout: Optional[Path] = None) -> Optional[Path]:
    """The first directory of :func:`data_dirs` that holds every file of ``datasets`` (default all), each
    matching its hashes (:func:`check_dir`, cached), or None. A complete but corrupt copy is passed over
    (:func:`missing_data_message` names it and its files)."""
    with _Checks() as checks:
        for _, path in data_dirs(checkout):
            if not path.is_dir() or missing_files(path, datasets):
                continue
            if not checks.dir(path, datasets)[1]:
                return path
    return None


def _count(items: Sequence, noun: str) -> str:
    return f"{len(items)} {noun}" + ("" if len(items) == 1 else "s")


def _names(items: Sequence[DataFile], limit: int = 3) -> str:
    shown = ", ".join(f.path for f in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def repair_command(path: Path) -> str:
    """The command that replaces the bad files of the data directory ``path``."""
    return f"{FETCH_COMMAND} --dest {path} --force (add --from DIR to copy them from a good copy instead)"


def missing_data_message(checkout: Optional[Path] = None, datasets: Optional[Iterable[str]] = None) -> str:
    """One line: where the data was looked for and the command that fetches it; a complete copy whose files do
    not match their hashes is named, with those files and the command that repairs it."""
    dirs = data_dirs(checkout)
    places = ", ".join(str(p) for _, p in dirs)
    bad = []
    with _Checks() as checks:
        for _, path in dirs:
            if path.is_dir() and not missing_files(path, datasets):
                corrupt = [f for f, _ in checks.dir(path, datasets)[1]]
                if corrupt:
                    bad.append(f"{path} is complete but holds {_count(corrupt, 'corrupt file')} ({_names(corrupt)}: "
                               f"wrong hash); repair it with: {repair_command(path)}")
    if bad:
        return f"test data not usable (no complete, intact copy in {places}): " + "; ".join(bad)
    return f"test data not found (no complete copy in {places}); run: {FETCH_COMMAND}"


def require_data() -> bool:
    """True when ``$EL_REQUIRE_DATA`` asks that missing data fail the tests instead of skipping them (CI)."""
    return os.environ.get("EL_REQUIRE_DATA", "").strip().lower() not in ("", "0", "false", "no")


# --- verification -----------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_gunzip(path: Path) -> str:
    h = hashlib.sha256()
    with gzip.open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


#: how many files :func:`check_file` has hashed in this process (the tests read it; the lookup's cache keeps it low)
files_hashed = 0


def check_file(entry: DataFile, path: Path) -> str:
    """Why ``path`` is not a good copy of ``entry`` ('' when it is).

    Good: its sha256 is the stored one; or, for a file this module gzips itself
    (``how`` other than ``copy``), the sha256 of its uncompressed content is
    ``raw_sha256`` (Python's gzip output differs from GNU ``gzip -n -9``).
    """
    global files_hashed
    path = Path(path)
    if not path.is_file():
        return "missing"
    files_hashed += 1
    try:
        actual = _sha256_file(path)
        size = path.stat().st_size
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    if actual == entry.sha256:
        return ""
    if entry.how != "copy":
        try:
            raw = _sha256_gunzip(path)
        except (OSError, EOFError, zlib.error) as e:
            return f"not a readable gzip file ({e}); sha256 {actual}, expected {entry.sha256} ({size} bytes)"
        if raw == entry.raw_sha256:
            return ""
        return f"content sha256 {raw}, expected {entry.raw_sha256} (file sha256 {actual}, {size} bytes)"
    return f"sha256 {actual}, expected {entry.sha256} ({size} bytes, expected {entry.size})"


def verify(root: Path, datasets: Optional[Iterable[str]] = None) -> List[Tuple[DataFile, str]]:
    """Check every file of ``datasets`` (default all) under ``root``: (entry, problem) for those that fail."""
    return [(f, p) for f in _select(datasets) for p in [check_file(f, Path(root) / f.dataset / f.name)] if p]


# --- derivation -------------------------------------------------------------------------------------

_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")
_BPE = re.compile(r"(@@ )|(@@ ?$)")


def _segments(text: str) -> List[str]:
    # The same rule as fairseq_el.prep_common.xml_segments + unescape_segment (the core may not import
    # the plugin; tests/core/tools/test_data.py checks that the two agree).
    return [" ".join(html.unescape(_SEG_CLOSE.sub("", _SEG_OPEN.sub("", line))).split())
            for line in text.split("\n") if "<seg id" in line]


def derive(entry: DataFile, parts: Sequence[bytes]) -> bytes:
    """The uncompressed content of ``entry`` made from its parts' bytes, as ``entry.how`` says.

    ``text``: the parts as they are; ``text-trim``: trailing empty lines dropped;
    ``unbpe``: ``sed -r 's/(@@ )|(@@ ?$)//g'`` per line; ``segs``: the ``<seg>``
    texts of each XML part, XML entities unescaped, whitespace stripped and runs
    collapsed, one per line. Tooling, no equation.
    """
    if entry.how == "text":
        return b"".join(parts)
    if entry.how == "text-trim":
        return b"".join(parts).rstrip(b"\n") + b"\n"
    if entry.how == "unbpe":
        lines = b"".join(parts).decode("utf-8").split("\n")
        tail = lines.pop() if lines and lines[-1] == "" else None
        out = "\n".join(_BPE.sub("", line) for line in lines) + ("\n" if tail is not None else "")
        return out.encode("utf-8")
    if entry.how == "segs":
        lines = [seg for part in parts for seg in _segments(part.decode("utf-8"))]
        return "".join(line + "\n" for line in lines).encode("utf-8")
    raise DataError(f"{entry.path}: cannot derive a file of kind {entry.how!r}")


# --- download ---------------------------------------------------------------------------------------

#: seconds allowed to connect to a server (name lookup, TCP, TLS); ``$EL_FETCH_CONNECT_TIMEOUT`` overrides it
CONNECT_TIMEOUT = 10.0
#: seconds a connected server may send nothing before its download is given up; ``$EL_FETCH_STALL_TIMEOUT``
STALL_TIMEOUT = 30.0
#: seconds between progress lines (on stderr) while a download runs; ``$EL_FETCH_PROGRESS_EVERY``
PROGRESS_EVERY = 3.0
#: connection attempts to one server that fail in a row before fetch takes it as unreachable: its other
#: URLs are skipped (their files fall back to other servers), and when every server fetch needs is
#: unreachable, fetch stops
GIVE_UP_AFTER = 2
READ = 64 << 10


class _WriteFailed(DataError):
    """A file under the destination cannot be written (read-only folder, full disk): fetch stops."""


class _NetworkDown(DataError):
    """Every server fetch needs failed :data:`GIVE_UP_AFTER` connection attempts in a row: fetch stops."""


class _Unreached(DataError):
    """No source of one file could even be connected to."""


class _ConnectFailed(Exception):
    """No connection to one URL (its message is the reason)."""


def _human(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{int(n):,} bytes"


def _seconds(value: Optional[float], env: str, default: float, name: str) -> float:
    where = name
    if value is None:
        text = os.environ.get(env, "").strip()
        if not text:
            return default
        where = f"${env}={text}"
        try:
            value = float(text)
        except ValueError:
            raise DataError(f"{where}: not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise DataError(f"{where}: must be a positive number of seconds")
    return float(value)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class _Net:
    """The timeouts of one fetch and what its connection attempts found so far."""

    connect_timeout: float
    stall_timeout: float
    progress_every: float
    progress: Callable[[str], None]
    give_up_after: int = GIVE_UP_AFTER
    servers: Set[str] = field(default_factory=set)  # every server (host[:port]) the files of this fetch name
    failures: Dict[str, List[str]] = field(default_factory=dict)  # server -> its connection failures in a row
    dead: Dict[str, str] = field(default_factory=dict)  # servers taken as unreachable -> the last reason
    streak: List[DataFile] = field(default_factory=list)  # files failed for lack of any connection, since then

    def connected(self, url: str) -> None:
        server = _server(url)
        self.failures.pop(server, None)
        self.dead.pop(server, None)
        self.streak.clear()

    def unreachable(self, url: str) -> Optional[str]:
        """Why ``url``'s server is taken as unreachable (its URLs are skipped), or None."""
        return self.dead.get(_server(url))

    def connect_failed(self, url: str, reason: str) -> None:
        server = _server(url)
        failures = self.failures.setdefault(server, [])
        failures.append(reason)
        if len(failures) < self.give_up_after:
            return
        self.dead[server] = reason
        if self.servers and self.servers <= set(self.dead):
            attempts = sum(len(self.failures.get(name, ())) for name in self.dead)
            reasons = "; ".join(f"{name}: {why}" for name, why in self.dead.items())
            raise _NetworkDown(
                f"the network seems unreachable: {attempts} connection attempts failed, {self.give_up_after} in a "
                f"row to each server the files need ({reasons}), so fetch stopped; to copy the data from a local "
                f"copy instead: {FETCH_COMMAND} --from DIR (e.g. a checkout's ../shared/data)")


def _server(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


class _TimedConnection:
    """An ``http.client`` connection that connects (TCP, and TLS for https) within the connect timeout,
    then waits at most the stall timeout for each read. ``state["connected"]`` records that the TCP
    connection was made (to tell an unreachable host from a silent or failing one), ``state["ready"]``
    that TLS, if any, was set up too."""

    def __init__(self, *args, stall_timeout: float, state: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self._stall, self._state = stall_timeout, state
        create = self._create_connection

        def create_connection(*a, **kw):
            sock = create(*a, **kw)
            state["connected"] = True
            return sock

        self._create_connection = create_connection

    def connect(self):
        super().connect()
        self._state["ready"] = True
        self.sock.settimeout(self._stall)


class _HTTPConnection(_TimedConnection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_TimedConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, connection):
        super().__init__()
        self._connection = connection

    def http_open(self, req):
        return self.do_open(self._connection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, connection):
        super().__init__()
        self._connection = connection

    def https_open(self, req):
        return self.do_open(self._connection, req, context=self._context)


def _opener(state: dict, stall_timeout: float) -> urllib.request.OpenerDirector:
    kw = {"stall_timeout": stall_timeout, "state": state}
    return urllib.request.build_opener(_HTTPHandler(functools.partial(_HTTPConnection, **kw)),
                                       _HTTPSHandler(functools.partial(_HTTPSConnection, **kw)))


def _connect_reason(err, connect_timeout: float) -> str:
    if isinstance(err, socket.timeout):
        return f"no connection within {connect_timeout:g} s"
    if isinstance(err, socket.gaierror):
        return f"cannot resolve the host name ({err.strerror or err})"
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err)


class _Meter:
    """While a download runs, a progress line every ``every`` seconds from a background thread:
    bytes so far, of the total when known, and the rate (or how long no byte came)."""

    def __init__(self, label: str, host: str, every: float, emit: Callable[[str], None]):
        self.label, self.host, self.every, self.emit = label, host, every, emit
        self.answered, self.done, self.total = False, 0, 0
        self.t0 = self.last_byte = time.monotonic()
        self._seen = (self.t0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"progress {label}", daemon=True)

    def begin(self, have: int, total: int) -> None:
        now = time.monotonic()
        self.done, self.total, self._seen, self.last_byte, self.answered = have, total, (now, have), now, True

    def add(self, n: int) -> None:
        self.done += n
        self.last_byte = time.monotonic()

    def line(self) -> str:
        now = time.monotonic()
        if not self.answered:
            return f"  {self.label}: waiting for {self.host} ({now - self.t0:.0f} s)"
        (t, before), done = self._seen, self.done
        self._seen = (now, done)
        size = _human(done) + (f" of {_human(self.total)} ({100 * done / self.total:.0f}%)" if self.total else "")
        if done > before:
            return f"  {self.label}: {size}, {_human((done - before) / max(now - t, 1e-6))}/s"
        return f"  {self.label}: {size}, no data for {now - self.last_byte:.0f} s"

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):  # a closed stderr must not stop the download
                self.emit(self.line())

    def __enter__(self) -> "_Meter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class _Sink:
    """A file under the destination, open for writing: any ``OSError`` (full disk, read-only folder)
    becomes :class:`_WriteFailed` naming ``shown``. Flushed and fsync'ed when the block ends
    normally; just closed otherwise."""

    def __init__(self, path: Path, mode: str, shown: Path):
        self.shown = shown
        try:
            self.f = open(path, mode)
        except OSError as e:
            raise _WriteFailed(os_error_line(e, shown)) from None

    def write(self, data: bytes) -> None:
        try:
            self.f.write(data)
        except OSError as e:
            raise _WriteFailed(os_error_line(e, self.shown)) from None

    def __enter__(self) -> "_Sink":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            with contextlib.suppress(OSError):
                self.f.close()
            return
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            with contextlib.suppress(OSError):
                self.f.close()
            raise _WriteFailed(os_error_line(e, self.shown)) from None


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _WriteFailed(os_error_line(e, folder)) from None


def _rename(src: Path, dst: Path) -> None:
    try:
        src.replace(dst)
    except OSError as e:
        raise _WriteFailed(os_error_line(e, dst)) from None


def _download(url: str, part: Path, label: str, log: Callable[[str], None], net: _Net, shown: Path) -> None:
    """Complete ``part`` from ``url``: a partial ``part`` is resumed with an HTTP Range request.

    :class:`_ConnectFailed` when no connection was made; ``OSError`` and urllib's errors when the server
    failed (an HTTP error, no answer or no byte for the stall timeout, a short body)."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "encouraging-loss-data"})
    if have and url.startswith(("http://", "https://")):
        request.add_header("Range", f"bytes={have}-")
    state = {"connected": False}
    with _Meter(label, urllib.parse.urlsplit(url).hostname or url, net.progress_every, net.progress) as meter:
        try:
            response = _opener(state, net.stall_timeout).open(request, timeout=net.connect_timeout)
        except urllib.error.HTTPError as e:
            net.connected(url)
            if e.code == 416 and have:  # nothing left to send: the partial file is whole
                return
            raise
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            if not state["connected"]:
                raise _ConnectFailed(_connect_reason(reason, net.connect_timeout)) from None
            net.connected(url)
            if isinstance(reason, socket.timeout):
                if not state.get("ready"):
                    raise OSError(f"connected, but no TLS handshake within {net.connect_timeout:g} s") from None
                raise OSError(f"connected, but no answer within {net.stall_timeout:g} s") from None
            raise
        net.connected(url)
        with response:
            status = response.getcode() or 200
            if have and status != 206:
                have = 0  # the server ignored the range: start again
            length = response.headers.get("Content-Length")
            total = have + int(length) if length and length.isdigit() else 0
            if have:
                log(f"  {label}: resuming at {_human(have)}" + (f" of {_human(total)}" if total else ""))
            meter.begin(have, total)
            done = have
            read = getattr(response, "read1", response.read)  # read1: what has come, not a full block
            with _Sink(part, "ab" if have else "wb", shown) as sink:
                while True:
                    try:
                        block = read(READ)
                    except socket.timeout:
                        raise OSError(f"stalled: no data for {net.stall_timeout:g} s after {_human(done)}") from None
                    if not block:
                        break
                    sink.write(block)
                    done += len(block)
                    meter.add(len(block))
    if total and done < total:
        raise OSError(f"connection closed after {done} of {total} bytes")


def _download_any(urls: Sequence[str], part: Path, label: str, log: Callable[[str], None], net: _Net,
                  shown: Path) -> str:
    """Complete ``part`` from the first of ``urls`` that works; one-line DataError naming them all when none
    does (:class:`_Unreached` when none could be connected to, or all were on servers taken as
    unreachable: skipped); :class:`_NetworkDown` when every server the fetch needs is unreachable."""
    errors, unreached = [], True
    for url in urls:
        dead = net.unreachable(url)
        if dead is not None:
            errors.append(f"{url} (skipped: {_server(url)} unreachable, {dead})")
            continue
        try:
            _download(url, part, label, log, net, shown)
            return url
        except _ConnectFailed as e:
            errors.append(f"{url} ({e})")
            log(f"  {label}: {url} failed: {e}")
            net.connect_failed(url, str(e))
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            unreached = False
            reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else (
                getattr(e, "reason", None) or e)
            errors.append(f"{url} ({reason})")
            log(f"  {label}: {url} failed: {reason}")
    kept = part.is_file() and part.stat().st_size > 0
    raise (_Unreached if unreached else DataError)(
        f"{label}: could not download it from any source: {'; '.join(errors)}"
        + (" (a partial download is kept and resumed next time)" if kept else ""))


def _member(archive: Path, member: str, label: str) -> bytes:
    try:
        with tarfile.open(archive) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            return f.read()
    except (tarfile.TarError, KeyError, OSError, EOFError) as e:
        archive.unlink(missing_ok=True)
        raise DataError(f"{label}: {archive.name} has no readable member {member} ({e}); removed, fetch again")


def _copy(src: Path, part: Path, shown: Path) -> None:
    try:
        source = open(src, "rb")
    except OSError as e:
        raise DataError(os_error_line(e, src, "cannot read")) from None
    with source, _Sink(part, "wb", shown) as sink:
        while True:
            try:
                block = source.read(CHUNK)
            except OSError as e:
                raise DataError(os_error_line(e, src, "cannot read")) from None
            if not block:
                break
            sink.write(block)


def _fetch_one(entry: DataFile, dest: Path, source_dir: Optional[Path], log: Callable[[str], None],
               net: _Net) -> int:
    """Put a verified copy of ``entry`` at ``dest/<dataset>/<name>``; its size in bytes.

    Everything is written under a ``.part`` name and renamed only once it verifies. A partial download
    of a byte-for-byte file stays as ``<name>.part`` (resumed next time); any other ``.part`` is removed
    when its file fails, whatever the reason."""
    final = dest / entry.dataset / entry.name
    _mkdir(final.parent)
    part = final.with_name(final.name + ".part")
    resumable = source_dir is None and entry.how == "copy"
    downloads: List[Path] = []
    try:
        if source_dir is not None:
            src = Path(source_dir) / entry.dataset / entry.name
            if not src.is_file():
                raise DataError(f"{entry.path}: not in {source_dir} (its public source: {entry.source})")
            log(f"copying {entry.path} from {src}")
            _copy(src, part, final)
        elif entry.how == "copy":
            log(f"downloading {entry.path} ({_human(entry.size)})")
            _download_any(entry.parts[0].urls, part, entry.path, log, net, final)
        else:
            blobs = []
            for p in entry.parts:
                got = dest / ".downloads" / entry.dataset / p.name
                _mkdir(got.parent)
                if not got.is_file():
                    log(f"downloading {p.name} for {entry.path}")
                    got_part = got.with_name(got.name + ".part")
                    _download_any(p.urls, got_part, f"{entry.path} <- {p.name}", log, net, got)
                    _rename(got_part, got)
                downloads.append(got)
                blobs.append(_member(got, p.member, entry.path) if p.member else got.read_bytes())
            try:
                actual = hashlib.sha256(content := derive(entry, blobs)).hexdigest()
            except UnicodeDecodeError as e:
                actual = f"none (not UTF-8 text: {e})"
            if actual != entry.raw_sha256:
                for d in downloads:
                    d.unlink(missing_ok=True)
                raise DataError(f"{entry.path}: refused: content derived ({entry.how}) from {entry.source} has sha256 "
                                f"{actual}, expected {entry.raw_sha256}; downloads removed"
                                + (f"; note: {entry.note}" if entry.note else ""))
            with _Sink(part, "wb", final) as sink:
                sink.write(gzip.compress(content, compresslevel=9, mtime=0))
    except BaseException:
        with contextlib.suppress(OSError):
            if not resumable or part.stat().st_size == 0:
                part.unlink()
        raise
    problem = check_file(entry, part)
    if problem:
        part.unlink(missing_ok=True)
        where = source_dir if source_dir is not None else entry.source
        raise DataError(f"{entry.path}: refused, {problem}; from {where}; the bad copy was removed")
    _rename(part, final)
    size = final.stat().st_size
    log(f"  ok {entry.path}: {_human(size)}")
    return size


def fetch(dest: Optional[Path] = None, datasets: Optional[Iterable[str]] = None, source_dir: Optional[Path] = None,
          force: bool = False, files: Optional[Sequence[DataFile]] = None,
          log: Callable[[str], None] = print, *, connect_timeout: Optional[float] = None,
          stall_timeout: Optional[float] = None, progress_every: Optional[float] = None,
          progress: Optional[Callable[[str], None]] = None, give_up_after: int = GIVE_UP_AFTER) -> Dict[str, List]:
    """Fetch and verify the files of ``datasets`` (default all) into ``dest`` (default :func:`cache_dir`).

    From their public sources, or copied from ``source_dir`` (a directory with the
    same layout, e.g. ``../shared/data``). A present file that verifies is kept;
    a present file that does not is an error unless ``force``. Returns
    ``{"fetched": [(entry, bytes)], "present": [(entry, bytes)], "failed": [(entry, message)],
    "not_tried": [entry], "stopped": message}``: ``stopped`` (one line, else "") says why fetch
    stopped early, leaving ``not_tried``: a file under ``dest`` that cannot be written (read-only
    folder, full disk), or every server the files name failed ``give_up_after`` connection attempts
    in a row (the network is unreachable; the files that failed only for that are in ``not_tried``,
    not ``failed``). A server that failed so is skipped for the rest of the fetch (files fall back
    to their other sources).
    ``files`` replaces the table (tests point entries at a local server).

    Downloads wait ``connect_timeout`` seconds for a connection (default
    ``$EL_FETCH_CONNECT_TIMEOUT``, else 10) and ``stall_timeout`` seconds for each byte once
    connected (``$EL_FETCH_STALL_TIMEOUT``, else 30); every ``progress_every`` seconds
    (``$EL_FETCH_PROGRESS_EVERY``, else 3) a running download reports its bytes, total and rate
    through ``progress`` (default: a line on stderr). ``log`` gets the other lines.
    Tooling for the data of the paper's experiments (no equation).
    """
    dest = Path(dest) if dest is not None else cache_dir()
    entries = list(files) if files is not None else _select(datasets)
    net = _Net(_seconds(connect_timeout, "EL_FETCH_CONNECT_TIMEOUT", CONNECT_TIMEOUT, "connect_timeout"),
               _seconds(stall_timeout, "EL_FETCH_STALL_TIMEOUT", STALL_TIMEOUT, "stall_timeout"),
               _seconds(progress_every, "EL_FETCH_PROGRESS_EVERY", PROGRESS_EVERY, "progress_every"),
               progress or _stderr, max(1, int(give_up_after)))
    net.servers = {_server(url) for entry in entries if not (dest / entry.dataset / entry.name).exists()
                   for part in entry.parts for url in part.urls}
    report: Dict[str, List] = {"fetched": [], "present": [], "failed": [], "not_tried": [], "stopped": ""}
    with _Checks() as checks:  # what fetch verifies, the lookup need not hash again
        for i, entry in enumerate(entries):
            final = dest / entry.dataset / entry.name
            if final.exists():
                problem = check_file(entry, final)
                checks.remember(final, entry, problem)
                if not problem:
                    report["present"].append((entry, final.stat().st_size))
                    continue
                if not force:
                    report["failed"].append((entry, f"{entry.path}: present at {final} but {problem}; "
                                                    f"remove it or rerun with --force to replace it"))
                    continue
                log(f"replacing {entry.path} ({problem})")
            try:
                report["fetched"].append((entry, _fetch_one(entry, dest, source_dir, log, net)))
                checks.remember(final, entry, "")
            except _NetworkDown as e:
                report["failed"] = [(f, m) for f, m in report["failed"] if f not in net.streak]
                report["not_tried"] = [f for f in entries[:i] if f in net.streak] + entries[i:]
                report["stopped"] = str(e)
                break
            except _WriteFailed as e:
                report["not_tried"] = entries[i:]
                part = final.with_name(final.name + ".part")
                kept = f"; the partial download {part.name} is kept and resumed next time" if part.is_file() else ""
                report["stopped"] = (f"{e}; fetch stopped there ({len(report['fetched'])} files fetched, "
                                     f"{len(entries) - i} not tried{kept}); rerun once {dest} can be written to: "
                                     f"the files already there are checked and kept")
                break
            except _Unreached as e:
                report["failed"].append((entry, str(e)))
                net.streak.append(entry)
            except DataError as e:
                report["failed"].append((entry, str(e)))
    if not report["failed"] and not report["stopped"] and (dest / ".downloads").is_dir():
        shutil.rmtree(dest / ".downloads", ignore_errors=True)
    return report


# --- command line -----------------------------------------------------------------------------------


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of seconds")
    return value


def build_parser() -> Parser:
    parser = Parser(prog="el-data",
                    description="Fetch, verify and locate the project's test and benchmark data "
                                f"({', '.join(DATASETS)}).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fetch,verify,where}")
    fp = sub.add_parser("fetch", help="download (or copy with --from) and verify the data",
                        description="Download the data from its public sources (or copy it from a local mirror "
                                    "with --from), verify every file's sha256 and put it under DEST/<dataset>/. "
                                    "A running download prints its progress on stderr every few seconds "
                                    f"($EL_FETCH_PROGRESS_EVERY, default {PROGRESS_EVERY:g}); after "
                                    f"{GIVE_UP_AFTER} connection attempts in a row fail, a server is skipped (files "
                                    "fall back to their other sources), and when every server is, fetch stops "
                                    "(the network is taken as unreachable); a destination that cannot be written to "
                                    "stops it "
                                    "too. Files are written under a .part name and renamed once verified.")
    fp.add_argument("--dest", type=Path, default=cache_dir(),
                    help="where to put the data ($EL_DATA, else the user's cache)")
    fp.add_argument("--only", action="append", choices=DATASETS, metavar="DATASET",
                    help=f"fetch only this dataset (repeatable): {', '.join(DATASETS)}")
    fp.add_argument("--from", dest="source_dir", type=Path, metavar="DIR",
                    help="copy from DIR (same layout, e.g. ../shared/data) instead of downloading")
    fp.add_argument("--force", action="store_true", help="replace present files that fail verification")
    fp.add_argument("--connect-timeout", type=_positive_seconds, metavar="SECONDS",
                    help="seconds to wait for a connection to a server "
                         f"(default: $EL_FETCH_CONNECT_TIMEOUT, else {CONNECT_TIMEOUT:g})")
    fp.add_argument("--stall-timeout", type=_positive_seconds, metavar="SECONDS",
                    help="seconds a connected server may send nothing before its download is given up "
                         f"(default: $EL_FETCH_STALL_TIMEOUT, else {STALL_TIMEOUT:g})")
    vp = sub.add_parser("verify", help="check a data directory against the table",
                        description="Check every file of a data directory: missing files are named with "
                                    "their public source, corrupt ones with the expected and actual hash.")
    vp.add_argument("--dir", type=Path, default=cache_dir(), help="data directory to check")
    vp.add_argument("--only", action="append", choices=DATASETS, metavar="DATASET",
                    help="check only this dataset (repeatable)")
    sub.add_parser("where", help="where the tests look for data, in order, and which one they use",
                   description="Print the directories the tests look in, in order, the state of each (every "
                               "present file is checked against its hashes; a file unchanged since it last "
                               "verified, same size, mtime, inode and ctime, is not read again: see "
                               "$EL_VERIFY_CACHE) and which one they use. Exit status 1 when a complete copy "
                               "has corrupt files.")
    return parser


def _summary(items: List[Tuple[DataFile, int]]) -> str:
    return f"{len(items)} files, {_human(sum(n for _, n in items))}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    if args.command == "fetch":
        if args.source_dir is not None and not args.source_dir.is_dir():
            parser.error(f"--from {args.source_dir}: no such directory")
        if args.dest.exists() and not args.dest.is_dir():
            parser.error(f"--dest {args.dest}: exists and is not a directory")
        try:
            report = fetch(args.dest, args.only, args.source_dir, args.force,
                           connect_timeout=args.connect_timeout, stall_timeout=args.stall_timeout)
        except DataError as e:  # a bad $EL_FETCH_* value
            parser.error(str(e))
        for entry, message in report["failed"]:
            print(f"{prog}: error: {message}", file=sys.stderr)
        if report["stopped"]:
            print(f"{prog}: error: {report['stopped']}", file=sys.stderr)
        not_tried = f"; not tried {len(report['not_tried'])}" if report["not_tried"] else ""
        print(f"fetched {_summary(report['fetched'])}; already present {_summary(report['present'])}; "
              f"failed {len(report['failed'])}{not_tried}; in {args.dest}")
        return 1 if report["failed"] or report["stopped"] else 0
    if args.command == "verify":
        entries = _select(args.only)
        problems = []
        with _Checks() as checks:
            for f in entries:
                path = args.dir / f.dataset / f.name
                p = check_file(f, path)
                if p != "missing":
                    checks.remember(path, f, p)
                if p:
                    problems.append(p)
                if not p:
                    print(f"ok       {f.path}")
                elif p == "missing":
                    print(f"MISSING  {f.path} (source: {f.source}; fetch it with {FETCH_COMMAND} --only {f.dataset})")
                else:
                    print(f"CORRUPT  {f.path}: {p}")
        n_missing = problems.count("missing")
        n_ok, n_corrupt = len(entries) - len(problems), len(problems) - n_missing
        print(f"{n_ok} ok, {n_missing} missing, {n_corrupt} corrupt in {args.dir}")
        return 1 if problems else 0
    print("the tests use the first of these that holds every file, each matching its hashes:")
    used, repairs = None, []
    with _Checks() as checks:  # the same checks as find_data's, once
        for i, (label, path) in enumerate(data_dirs(), 1):
            if not path.is_dir():
                state = "absent"
            else:
                missing, corrupt = checks.dir(path)
                parts = ([f"{len(missing)} of {len(FILES)} files missing"] if missing else []) + (
                    [f"CORRUPT: {_count(corrupt, 'file')} with the wrong hash ({_names([f for f, _ in corrupt])})"]
                    if corrupt else [])
                state = ", ".join(parts) or "complete, verified"
                if corrupt and not missing:
                    repairs.append(path)
                if used is None and not parts:
                    used = path
            print(f"  {i}. {label:15s} {path}  [{state}]" + ("  <- used" if path == used else ""))
    for path in repairs:
        print(f"repair {path} with: {repair_command(path)}")
    if used is None:
        print(f"none is complete; run: {FETCH_COMMAND}" if not repairs else
              "none is complete and intact")
    print(f"hash checks: {checks.hashed} files hashed, {checks.cached} unchanged since they were hashed "
          f"(remembered in {checks.path})")
    return 1 if repairs else 0


if __name__ == "__main__":
    sys.exit(main())
