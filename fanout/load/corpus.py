"""A seeded, synthetic but realistic live-room message corpus.

Used by the load generator (``fanout load``) and by benchmarks that measure
bytes on the wire, so that compression sees text like a real room's: short
chat lines in a few languages with emoji, gift notices naming a gift and a
count, user ids and nicknames that repeat the way a room's regulars do.

Everything comes from a :class:`random.Random` seeded by the caller, so the
same seed gives the same messages on every machine and Python version.

>>> corpus = Corpus(seed=1)
>>> kind, sender, text = corpus.message(gift_share=0.5)
>>> payload = corpus.payload(text, size=50)   # 8-byte timestamp + text, 50 bytes
"""

from __future__ import annotations

import random
import struct
import time

__all__ = ["Corpus", "TIMESTAMP_BYTES", "stamp", "read_stamp"]

#: Size of the publish timestamp at the start of every load payload.
TIMESTAMP_BYTES = 8

_STAMP = struct.Struct("<Q")

_SYLLABLES = ("xiao", "yu", "mei", "long", "tian", "an", "ka", "ri", "na", "to", "mo",
              "li", "su", "jin", "bo", "chen", "ha", "ru", "ki", "sa", "lu", "zhi")
_NICK_STYLES = ("{a}{b}", "{a}_{b}{n}", "{A}{b}", "{a}{b}{n}", "{A}_{B}", "~{a}{b}~")
_CJK_NICKS = ("小鱼儿", "星星", "阿杰", "大熊", "糖糖", "月光", "老王", "喵喵", "追风", "小白")
_EMOJI = ("😂", "🔥", "❤️", "👍", "🎉", "😍", "👏", "🚀", "💯", "😭", "🥰", "✨", "🙏", "😎")
_PHRASES = (
    "hahaha", "lol", "so good", "again again", "666", "nice one", "gg", "wow",
    "first time here", "hello from Berlin", "love this song", "who is this",
    "this is insane", "can you play it again", "what game is this", "hi everyone",
    "let's go", "too funny", "best stream today", "my favourite part", "omg",
    "clip that", "how long till the next round", "good evening all", "nooo",
    "太好听了", "主播好帅", "哈哈哈哈", "来了来了", "前排", "加油", "好厉害", "晚上好",
    "すごい", "かわいい", "草", "ㅋㅋㅋ", "대박", "kkkkkk", "jajaja", "mdr",
)
_GIFTS = (("rose", 1), ("heart", 1), ("lollipop", 2), ("star", 5), ("crown", 20),
          ("sports car", 100), ("rocket", 500), ("castle", 1000), ("galaxy", 2000))
_GIFT_FORMS = ("{nick} sent {gift} x{n}", "{gift} x{n} from {nick}",
               "{nick}: {gift} combo x{n}", "{nick} sent a {gift}!")
_SYSTEM = ("{nick} joined the room", "{nick} followed the host", "{nick} shared the stream",
           "host is now live", "room rules: be kind", "{nick} is now a moderator")


def stamp(ns: int | None = None) -> bytes:
    """The 8-byte little-endian ``CLOCK_REALTIME`` nanosecond timestamp that
    starts a load payload (now, unless ``ns`` is given)."""
    return _STAMP.pack(time.time_ns() if ns is None else ns)


def read_stamp(payload: bytes) -> int:
    """The timestamp at the start of a load payload, in ns since the epoch."""
    return _STAMP.unpack_from(payload)[0]


class Corpus:
    """A reproducible stream of room messages.

    :param seed: the random seed; equal seeds give equal sequences.
    :param users: size of the room's user population (ids ``u<digits>``).
    """

    def __init__(self, seed: int = 0, users: int = 5000) -> None:
        self.rng = random.Random(seed)
        rng = random.Random(seed ^ 0x5EED)
        self.users = [f"u{rng.randrange(10**7, 10**8)}" for _ in range(users)]
        self.nicks = [self._nick(rng) for _ in range(users)]

    @staticmethod
    def _nick(rng: random.Random) -> str:
        if rng.random() < 0.25:
            return rng.choice(_CJK_NICKS) + (str(rng.randrange(100)) if rng.random() < 0.5 else "")
        a, b = rng.choice(_SYLLABLES), rng.choice(_SYLLABLES)
        return rng.choice(_NICK_STYLES).format(a=a, b=b, A=a.capitalize(), B=b.capitalize(),
                                               n=rng.randrange(1, 1000))

    def _user(self) -> int:
        # A room's regulars talk most: a skewed pick over the population.
        n = len(self.users)
        if self.rng.random() < 0.6:
            return min(int((self.rng.paretovariate(1.0) - 1.0) * 50), n - 1)
        return self.rng.randrange(n)

    def chat(self) -> str:
        """One chat line: a phrase or two, often with emoji."""
        rng = self.rng
        text = rng.choice(_PHRASES)
        if rng.random() < 0.3:
            text += " " + rng.choice(_PHRASES)
        if rng.random() < 0.5:
            text += " " + rng.choice(_EMOJI) * rng.randint(1, 3)
        return text

    def gift(self, nick: str) -> str:
        """One gift notice naming the gift, the count and the sender."""
        rng = self.rng
        gift, _value = rng.choice(_GIFTS)
        return rng.choice(_GIFT_FORMS).format(nick=nick, gift=gift,
                                              n=rng.choice((1, 1, 1, 2, 5, 10, 99)))

    def system(self, nick: str) -> str:
        """One system notice."""
        return self.rng.choice(_SYSTEM).format(nick=nick)

    def message(self, gift_share: float = 0.5, system_share: float = 0.0) -> tuple[str, str, str]:
        """The next message as ``(kind, sender, text)``; ``kind`` is a name of
        :data:`fanout.protocol.wire.KIND_NAMES` (``"chat"``, ``"gift"``, ``"system"``).

        :param gift_share: probability of a gift.
        :param system_share: probability of a system notice (taken from chat's share).
        """
        i = self._user()
        nick = self.nicks[i]
        r = self.rng.random()
        if r < gift_share:
            return "gift", "gift-svc", self.gift(nick)
        if r < gift_share + system_share:
            return "system", "system", self.system(nick)
        return "chat", self.users[i], f"{nick}: {self.chat()}"

    def pad(self, text: str, size: int) -> bytes:
        """``text`` as UTF-8, cut or extended with more chat to exactly ``size``
        bytes (a cut may split a multi-byte character: payloads are opaque)."""
        data = text.encode("utf-8")
        while len(data) < size:
            data += b" " + self.chat().encode("utf-8")
        return data[:size]

    def payload(self, text: str, size: int = 50, ts_ns: int | None = None) -> bytes:
        """A load payload of ``size`` bytes: the timestamp, then ``text`` padded or cut."""
        if size < TIMESTAMP_BYTES:
            raise ValueError(f"a payload needs at least {TIMESTAMP_BYTES} bytes for its timestamp")
        return stamp(ts_ns) + self.pad(text, size - TIMESTAMP_BYTES)

    def messages(self, count: int, *, gift_share: float = 0.5,
                 size: int | None = 50) -> list[tuple[str, str, bytes]]:
        """``count`` messages as ``(kind, sender, payload)``; with ``size`` the
        payloads are timestamped and exactly that long, else the plain text."""
        out = []
        for _ in range(count):
            kind, sender, text = self.message(gift_share)
            out.append((kind, sender, self.payload(text, size) if size else text.encode("utf-8")))
        return out
