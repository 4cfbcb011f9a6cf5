"""Portuguese → English everyday phrases and short sentences (the `pt-en` tenant), from a grammar.

Noun phrases with gender and number agreement (adjectives after the noun in Portuguese,
before it in English; `a`/`an`), subjects with their verb forms in present, past and the
`ir + infinitive` future, negation with English do-support, `de`/`em` contracted with the
article (`do`, `na`...), places with their English preposition, questions and set phrases.
Every sentence is drawn from a seeded generator; `split` keeps held-out sentences unseen.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Noun:
    pt: str
    pt_plural: str
    gender: str  # "m" or "f"
    en: str
    en_plural: str
    kind: str  # object, food, animal, person, place, readable, openable
    at: str = "at"  # English preposition of a place ("at the beach", "in the park")


def _n(spec: str, kind: str, at: str = "at") -> Noun:
    """'gato gatos m cat cats' -> Noun (underscores stand for spaces inside a form)."""
    pt, pt_plural, gender, en, en_plural = (part.replace("_", " ") for part in spec.split())
    return Noun(pt, pt_plural, gender, en, en_plural, kind, at)


NOUNS = [
    *(
        _n(spec, "object")
        for spec in (
            "carro carros m car cars",
            "celular celulares m phone phones",
            "bicicleta bicicletas f bicycle bicycles",
            "mochila mochilas f backpack backpacks",
            "chave chaves f key keys",
            "cadeira cadeiras f chair chairs",
            "mesa mesas f table tables",
            "relógio relógios m watch watches",
            "camisa camisas f shirt shirts",
            "sapato sapatos m shoe shoes",
            "caneta canetas f pen pens",
            "computador computadores m computer computers",
            "copo copos m glass glasses",
            "prato pratos m plate plates",
            "bolsa bolsas f bag bags",
            "guarda-chuva guarda-chuvas m umbrella umbrellas",
            "lâmpada lâmpadas f lamp lamps",
            "casaco casacos m coat coats",
            "chapéu chapéus m hat hats",
            "vestido vestidos m dress dresses",
        )
    ),
    *(
        _n(spec, "openable")
        for spec in (
            "porta portas f door doors",
            "janela janelas f window windows",
            "caixa caixas f box boxes",
            "garrafa garrafas f bottle bottles",
            "gaveta gavetas f drawer drawers",
        )
    ),
    *(
        _n(spec, "readable")
        for spec in (
            "livro livros m book books",
            "jornal jornais m newspaper newspapers",
            "revista revistas f magazine magazines",
        )
    ),
    *(
        _n(spec, "letters")
        for spec in ("carta cartas f letter letters", "mensagem mensagens f message messages")
    ),
    *(
        _n(spec, "food")
        for spec in (
            "maçã maçãs f apple apples",
            "bolo bolos m cake cakes",
            "sanduíche sanduíches m sandwich sandwiches",
            "pizza pizzas f pizza pizzas",
            "banana bananas f banana bananas",
            "laranja laranjas f orange oranges",
            "biscoito biscoitos m cookie cookies",
            "ovo ovos m egg eggs",
            "tomate tomates m tomato tomatoes",
            "pão pães m bread_roll bread_rolls",
        )
    ),
    *(
        _n(spec, "animal")
        for spec in (
            "gato gatos m cat cats",
            "cachorro cachorros m dog dogs",
            "pássaro pássaros m bird birds",
            "cavalo cavalos m horse horses",
            "coelho coelhos m rabbit rabbits",
            "vaca vacas f cow cows",
            "galinha galinhas f chicken chickens",
            "peixe peixes m fish fish",
        )
    ),
    *(
        _n(spec, "person")
        for spec in (
            "menino meninos m boy boys",
            "menina meninas f girl girls",
            "médico médicos m doctor doctors",
            "professora professoras f teacher teachers",
            "vizinho vizinhos m neighbor neighbors",
            "amiga amigas f friend friends",
            "amigo amigos m friend friends",
            "turista turistas m tourist tourists",
            "motorista motoristas m driver drivers",
            "enfermeira enfermeiras f nurse nurses",
        )
    ),
    *(
        _n(spec, "place", at)
        for spec, at in (
            ("escola escolas f school schools", "at"),
            ("praia praias f beach beaches", "at"),
            ("mercado mercados m market markets", "at"),
            ("farmácia farmácias f pharmacy pharmacies", "at"),
            ("estação estações f station stations", "at"),
            ("hotel hotéis m hotel hotels", "at"),
            ("museu museus m museum museums", "at"),
            ("parque parques m park parks", "in"),
            ("biblioteca bibliotecas f library libraries", "at"),
            ("restaurante restaurantes m restaurant restaurants", "at"),
            ("banco bancos m bank banks", "at"),
            ("hospital hospitais m hospital hospitals", "at"),
            ("aeroporto aeroportos m airport airports", "at"),
            ("padaria padarias f bakery bakeries", "at"),
            ("cozinha cozinhas f kitchen kitchens", "in"),
            ("jardim jardins m garden gardens", "in"),
            ("igreja igrejas f church churches", "at"),
            ("cinema cinemas m cinema cinemas", "at"),
        )
    ),
]

# adjective: masculine singular, feminine singular, masculine plural, feminine plural, English
ADJECTIVES = [
    tuple(spec.split())
    for spec in (
        "novo nova novos novas new",
        "velho velha velhos velhas old",
        "grande grande grandes grandes big",
        "pequeno pequena pequenos pequenas small",
        "bonito bonita bonitos bonitas beautiful",
        "vermelho vermelha vermelhos vermelhas red",
        "azul azul azuis azuis blue",
        "verde verde verdes verdes green",
        "branco branca brancos brancas white",
        "preto preta pretos pretas black",
        "amarelo amarela amarelos amarelas yellow",
        "caro cara caros caras expensive",
        "barato barata baratos baratas cheap",
        "limpo limpa limpos limpas clean",
        "sujo suja sujos sujas dirty",
        "bom boa bons boas good",
        "ruim ruim ruins ruins bad",
        "moderno moderna modernos modernas modern",
        "antigo antiga antigos antigas ancient",
    )
]
# Adjectives that fit each kind of noun (an "expensive cow" is grammatical, but not everyday).
KIND_ADJECTIVES = {
    "object": ["novo", "velho", "grande", "pequeno", "bonito", "vermelho", "azul", "verde", "branco",
               "preto", "amarelo", "caro", "barato", "limpo", "sujo", "moderno"],
    "openable": ["novo", "velho", "grande", "pequeno", "vermelho", "azul", "verde", "branco", "preto",
                 "amarelo", "limpo", "sujo"],
    "readable": ["novo", "velho", "grande", "pequeno", "bom", "ruim", "bonito", "antigo"],
    "letters": ["novo", "velho", "bonito", "bom", "pequeno"],
    "food": ["grande", "pequeno", "bom", "ruim", "barato", "caro", "verde", "amarelo", "vermelho"],
    "animal": ["grande", "pequeno", "bonito", "velho", "preto", "branco", "sujo", "limpo"],
    "person": ["novo", "velho", "bom"],
    "place": ["novo", "velho", "grande", "pequeno", "bonito", "moderno", "antigo", "limpo", "sujo",
              "caro", "barato", "bom"],
}  # fmt: skip
ADJECTIVE_FORMS = {forms[0]: forms for forms in ADJECTIVES}

# determiner: masc sg, fem sg, masc pl, fem pl, English sg, English pl (None: no plural form)
DETERMINERS = {
    "the": ("o", "a", "os", "as", "the", "the"),
    "a": ("um", "uma", None, None, "a", None),
    "my": ("meu", "minha", "meus", "minhas", "my", "my"),
    "your": ("seu", "sua", "seus", "suas", "your", "your"),
    "our": ("nosso", "nossa", "nossos", "nossas", "our", "our"),
    "this": ("este", "esta", "estes", "estas", "this", "these"),
}
# `de` and `em` merge with a following article or demonstrative.
CONTRACTIONS = {
    "de": {"o": "do", "a": "da", "os": "dos", "as": "das", "este": "deste", "esta": "desta",
           "estes": "destes", "estas": "destas", "meu": "do meu", "minha": "da minha",
           "meus": "dos meus", "minhas": "das minhas", "seu": "do seu", "sua": "da sua",
           "seus": "dos seus", "suas": "das suas", "nosso": "do nosso", "nossa": "da nossa",
           "nossos": "dos nossos", "nossas": "das nossas"},
    "em": {"o": "no", "a": "na", "os": "nos", "as": "nas", "um": "num", "uma": "numa",
           "este": "neste", "esta": "nesta", "estes": "nestes", "estas": "nestas"},
}  # fmt: skip


@dataclass(frozen=True)
class Subject:
    pt: str
    en: str
    person: str  # the Portuguese verb form: 1s, 3s, 1p, 3p
    en_form: str  # the English verb form: "1s" (I), "3s" (he/she/it) or "pl" (you/we/they)


SUBJECTS = [
    Subject("eu", "I", "1s", "1s"),
    Subject("você", "you", "3s", "pl"),
    Subject("ele", "he", "3s", "3s"),
    Subject("ela", "she", "3s", "3s"),
    Subject("nós", "we", "1p", "pl"),
    Subject("eles", "they", "3p", "pl"),
    Subject("elas", "they", "3p", "pl"),
    Subject("vocês", "you", "3p", "pl"),
    Subject("minha mãe", "my mother", "3s", "3s"),
    Subject("meu pai", "my father", "3s", "3s"),
    Subject("meu irmão", "my brother", "3s", "3s"),
    Subject("minha irmã", "my sister", "3s", "3s"),
    Subject("a professora", "the teacher", "3s", "3s"),
    Subject("o vizinho", "the neighbor", "3s", "3s"),
    Subject("meus amigos", "my friends", "3p", "pl"),
    Subject("as crianças", "the children", "3p", "pl"),
    Subject("meus pais", "my parents", "3p", "pl"),
    *(Subject(name, name, "3s", "3s") for name in ("Ana", "Pedro", "Maria", "Lucas", "Beatriz", "Carlos",
                                                   "Sofia", "Rafael", "Júlia", "Marcos", "Helena", "Tiago")),
]  # fmt: skip
PERSONS = ("1s", "3s", "1p", "3p")


@dataclass(frozen=True)
class Verb:
    present: tuple[str, str, str, str]  # 1s, 3s, 1p, 3p
    past: tuple[str, str, str, str]
    infinitive: str
    preposition: str | None  # "de" for gostar de, precisar de
    en: str  # base form
    en_3s: str
    en_past: str
    kinds: tuple[str, ...]  # kinds of noun it takes as object


def _v(forms: str, infinitive: str, english: str, kinds: str, preposition: str | None = None) -> Verb:
    present, past = (tuple(half.split()) for half in forms.split("|"))
    en, en_3s, en_past = (part.replace("_", " ") for part in english.split())
    return Verb(present, past, infinitive, preposition, en, en_3s, en_past, tuple(kinds.split()))  # type: ignore[arg-type]


VERBS = [
    _v("compro compra compramos compram|comprei comprou compramos compraram", "comprar",
       "buy buys bought", "object food readable"),
    _v("vendo vende vendemos vendem|vendi vendeu vendemos venderam", "vender", "sell sells sold", "object"),
    _v("quero quer queremos querem|quis quis quisemos quiseram", "querer", "want wants wanted",
       "object food animal"),
    _v("tenho tem temos têm|tive teve tivemos tiveram", "ter", "have has had", "object animal"),
    _v("vejo vê vemos veem|vi viu vimos viram", "ver", "see sees saw", "object animal person place"),
    _v("procuro procura procuramos procuram|procurei procurou procuramos procuraram", "procurar",
       "look_for looks_for looked_for", "object animal person"),
    _v("encontro encontra encontramos encontram|encontrei encontrou encontramos encontraram", "encontrar",
       "find finds found", "object animal"),
    _v("lavo lava lavamos lavam|lavei lavou lavamos lavaram", "lavar", "wash washes washed", "object"),
    _v("abro abre abrimos abrem|abri abriu abrimos abriram", "abrir", "open opens opened", "openable"),
    _v("fecho fecha fechamos fecham|fechei fechou fechamos fecharam", "fechar", "close closes closed",
       "openable"),
    _v("leio lê lemos leem|li leu lemos leram", "ler", "read reads read", "readable letters"),
    _v("como come comemos comem|comi comeu comemos comeram", "comer", "eat eats ate", "food"),
    _v("gosto gosta gostamos gostam|gostei gostou gostamos gostaram", "gostar", "like likes liked",
       "object food animal person place readable", "de"),
    _v("preciso precisa precisamos precisam|precisei precisou precisamos precisaram", "precisar",
       "need needs needed", "object food", "de"),
    _v("visito visita visitamos visitam|visitei visitou visitamos visitaram", "visitar",
       "visit visits visited", "place person"),
    _v("ajudo ajuda ajudamos ajudam|ajudei ajudou ajudamos ajudaram", "ajudar", "help helps helped",
       "person"),
    _v("chamo chama chamamos chamam|chamei chamou chamamos chamaram", "chamar", "call calls called",
       "person animal"),
    _v("limpo limpa limpamos limpam|limpei limpou limpamos limparam", "limpar", "clean cleans cleaned",
       "object openable"),
    _v("pinto pinta pintamos pintam|pintei pintou pintamos pintaram", "pintar", "paint paints painted",
       "openable"),
    _v("escrevo escreve escrevemos escrevem|escrevi escreveu escrevemos escreveram", "escrever",
       "write writes wrote", "letters"),
]  # fmt: skip
TIMES = {
    "present": [("todos os dias", "every day"), ("de manhã", "in the morning"), ("à noite", "at night"),
                ("aos domingos", "on Sundays"), ("às vezes", "sometimes")],
    "past": [("ontem", "yesterday"), ("na semana passada", "last week"), ("no sábado", "on Saturday"),
             ("hoje de manhã", "this morning"), ("ontem à noite", "last night")],
    "future": [("amanhã", "tomorrow"), ("na próxima semana", "next week"), ("no domingo", "on Sunday"),
               ("hoje à noite", "tonight"), ("depois do almoço", "after lunch")],
}  # fmt: skip
GOING = {"1s": "vou", "3s": "vai", "1p": "vamos", "3p": "vão"}
BE_EN = {"1s": "am", "3s": "is", "pl": "are"}
ESTAR = {"1s": "estou", "3s": "está", "1p": "estamos", "3p": "estão"}
SER_3 = {False: "é", True: "são"}
NUMBERS = [("dois", "duas", "two"), ("três", "três", "three"), ("quatro", "quatro", "four"),
           ("cinco", "cinco", "five"), ("seis", "seis", "six"), ("dez", "dez", "ten")]  # fmt: skip
CITIES = [("Lisboa", "Lisbon"), ("Londres", "London"), ("Roma", "Rome"), ("Nova York", "New York"),
          ("Porto", "Porto"), ("São Paulo", "São Paulo"), ("Paris", "Paris"), ("Madri", "Madrid"),
          ("Recife", "Recife"), ("Berlim", "Berlin")]  # fmt: skip
SET_PHRASES = [
    ("bom dia", "good morning"), ("boa tarde", "good afternoon"), ("boa noite", "good night"),
    ("obrigado", "thank you"), ("muito obrigada", "thank you very much"), ("por favor", "please"),
    ("com licença", "excuse me"), ("desculpe", "sorry"), ("tudo bem?", "how are you?"),
    ("até logo", "see you later"), ("até amanhã", "see you tomorrow"),
    ("qual é o seu nome?", "what is your name?"),
    ("eu não entendo", "I don't understand"), ("você fala inglês?", "do you speak English?"),
    ("que horas são?", "what time is it?"), ("está chovendo", "it is raining"),
    ("está frio hoje", "it is cold today"),
    ("está muito quente", "it is very hot"), ("a conta, por favor", "the check, please"),
    ("onde fica o banheiro?", "where is the bathroom?"), ("eu estou com fome", "I am hungry"),
    ("eu estou com sede", "I am thirsty"), ("estou cansado", "I am tired"), ("parabéns!", "congratulations!"),
    ("boa viagem", "have a good trip"), ("feliz aniversário", "happy birthday"),
    ("não tem problema", "no problem"),
    ("fale mais devagar, por favor", "speak more slowly, please"), ("eu estou perdido", "I am lost"),
    ("pode me ajudar?", "can you help me?"), ("eu moro aqui", "I live here"),
    ("que dia é hoje?", "what day is today?"),
]  # fmt: skip
DRINKS = [("um café", "a coffee"), ("um chá", "a tea"), ("um copo de água", "a glass of water"),
          ("um suco de laranja", "an orange juice"), ("uma cerveja", "a beer"),
          ("um vinho tinto", "a red wine"), ("uma água com gás", "a sparkling water"),
          ("um leite", "a milk")]  # fmt: skip


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class NounPhrase:
    pt_det: str
    pt_rest: str  # the noun and its adjective
    en: str
    plural: bool

    @property
    def pt(self) -> str:
        return f"{self.pt_det} {self.pt_rest}"

    def after(self, preposition: str | None) -> str:
        """The Portuguese phrase after `de`/`em`, contracted with its determiner."""
        if preposition is None:
            return self.pt
        merged = CONTRACTIONS[preposition].get(self.pt_det)
        return f"{merged} {self.pt_rest}" if merged else f"{preposition} {self.pt}"


def noun_phrase(
    rng: random.Random,
    noun: Noun,
    determiners: tuple[str, ...] = tuple(DETERMINERS),
    plural_ok: bool = True,
    adjective_ok: bool = True,
) -> NounPhrase:
    det_name = rng.choice(determiners)
    det = DETERMINERS[det_name]
    plural = plural_ok and det[2] is not None and rng.random() < 0.35
    index = (2 if plural else 0) + (1 if noun.gender == "f" else 0)
    pt_noun, en_noun = (noun.pt_plural, noun.en_plural) if plural else (noun.pt, noun.en)
    adjective = None
    if adjective_ok and rng.random() < 0.6:
        adjective = ADJECTIVE_FORMS[rng.choice(KIND_ADJECTIVES[noun.kind])]
    pt_rest = f"{pt_noun} {adjective[index]}" if adjective else pt_noun
    en_rest = f"{adjective[4]} {en_noun}" if adjective else en_noun
    en_det = det[5] if plural else det[4]
    if en_det == "a":
        en_det = _article(en_rest)
    return NounPhrase(det[index], pt_rest, f"{en_det} {en_rest}", plural)


def _nouns(kinds: tuple[str, ...] | str) -> list[Noun]:
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    return [noun for noun in NOUNS if noun.kind in kinds]


def _en_verb(verb: Verb, subject: Subject, tense: str, negative: bool) -> str:
    if tense == "past":
        return f"didn't {verb.en}" if negative else verb.en_past
    if tense == "future":
        return f"{BE_EN[subject.en_form]} {'not ' if negative else ''}going to {verb.en}"
    if negative:
        return f"{'doesn' if subject.en_form == '3s' else 'don'}'t {verb.en}"
    return verb.en_3s if subject.en_form == "3s" else verb.en


def _pt_verb(verb: Verb, subject: Subject, tense: str, negative: bool) -> str:
    person = PERSONS.index(subject.person)
    if tense == "future":
        form = f"{GOING[subject.person]} {verb.infinitive}"
    else:
        form = (verb.past if tense == "past" else verb.present)[person]
    return f"não {form}" if negative else form


def action(rng: random.Random) -> tuple[str, str]:
    """Subject, verb (tense, maybe negated), object, maybe a time: 'ela comprou uma camisa azul ontem'."""
    subject, verb = rng.choice(SUBJECTS), rng.choice(VERBS)
    tense = rng.choices(["present", "past", "future"], [4, 3, 3])[0]
    negative = rng.random() < 0.2
    obj = noun_phrase(rng, rng.choice(_nouns(verb.kinds)), ("the", "a", "my", "your", "our", "this"))
    pt = f"{subject.pt} {_pt_verb(verb, subject, tense, negative)} {obj.after(verb.preposition)}"
    en = f"{subject.en} {_en_verb(verb, subject, tense, negative)} {obj.en}"
    if rng.random() < 0.35:
        pt_time, en_time = rng.choice(TIMES[tense])
        pt, en = f"{pt} {pt_time}", f"{en} {en_time}"
    return pt, en


def location(rng: random.Random) -> tuple[str, str]:
    """'meus amigos estão na praia' -> 'my friends are at the beach'."""
    subject, place = rng.choice(SUBJECTS), rng.choice(_nouns("place"))
    where = noun_phrase(rng, place, ("the", "this"), plural_ok=False)  # one place at a time
    be = BE_EN[subject.en_form]
    return (
        f"{subject.pt} {ESTAR[subject.person]} {where.after('em')}",
        f"{subject.en} {be} {place.at} {where.en}",
    )


def description(rng: random.Random) -> tuple[str, str]:
    """'os carros são caros' -> 'the cars are expensive'."""
    noun = rng.choice(NOUNS)
    subject = noun_phrase(rng, noun, ("the", "my", "your", "our", "this"), adjective_ok=False)
    adjective = ADJECTIVE_FORMS[rng.choice(KIND_ADJECTIVES[noun.kind])]
    index = (2 if subject.plural else 0) + (1 if noun.gender == "f" else 0)
    very = rng.random() < 0.25
    pt = f"{subject.pt} {SER_3[subject.plural]} {'muito ' if very else ''}{adjective[index]}"
    en = f"{subject.en} {'are' if subject.plural else 'is'} {'very ' if very else ''}{adjective[4]}"
    return pt, en


def question(rng: random.Random) -> tuple[str, str]:
    """Everyday questions: having, where, how much, can I, do you want."""
    shape = rng.randrange(5)
    if shape == 0:
        obj = noun_phrase(rng, rng.choice(_nouns(("object", "readable", "animal"))), ("a", "the"))
        return f"você tem {obj.pt}?", f"do you have {obj.en}?"
    if shape == 1:
        place = rng.choice(_nouns("place"))
        where = noun_phrase(rng, place, ("the",))
        verb_pt, verb_en = ("ficam", "are") if where.plural else ("fica", "is")
        return f"onde {verb_pt} {where.pt}?", f"where {verb_en} {where.en}?"
    if shape == 2:
        obj = noun_phrase(rng, rng.choice(_nouns(("object", "food", "readable"))), ("the", "this"))
        verb_pt, verb_en = ("custam", "are") if obj.plural else ("custa", "is")
        return f"quanto {verb_pt} {obj.pt}?", f"how much {verb_en} {obj.en}?"
    if shape == 3:
        verb = rng.choice(
            [v for v in VERBS if v.preposition is None and v.infinitive not in ("querer", "ter")]
        )
        obj = noun_phrase(rng, rng.choice(_nouns(verb.kinds)), ("the", "this", "your"))
        return f"posso {verb.infinitive} {obj.pt}?", f"can I {verb.en} {obj.en}?"
    obj = noun_phrase(rng, rng.choice(_nouns("food")), ("a", "this"))
    return f"você quer {obj.pt}?", f"do you want {obj.en}?"


def phrase(rng: random.Random) -> tuple[str, str]:
    """Set phrases, orders, origins, counts."""
    shape = rng.randrange(4)
    if shape == 0:
        return rng.choice(SET_PHRASES)
    if shape == 1:
        pt, en = rng.choice(DRINKS)
        polite = rng.random() < 0.5
        return (
            f"eu gostaria de {pt}{', por favor' if polite else ''}",
            f"I would like {en}{', please' if polite else ''}",
        )
    if shape == 2:
        subject = rng.choice(
            [s for s in SUBJECTS if s.pt in ("eu", "ele", "ela", "nós", "eles") or s.pt[0].isupper()]
        )
        pt_city, en_city = rng.choice(CITIES)
        ser = {"1s": "sou", "3s": "é", "1p": "somos", "3p": "são"}[subject.person]
        return f"{subject.pt} {ser} de {pt_city}", f"{subject.en} {BE_EN[subject.en_form]} from {en_city}"
    noun = rng.choice(_nouns(("object", "animal", "food", "readable")))
    number = rng.choice(NUMBERS)
    subject = rng.choice(SUBJECTS)
    have = VERBS[3]
    pt_number = number[1] if noun.gender == "f" else number[0]
    return (
        f"{subject.pt} {_pt_verb(have, subject, 'present', False)} {pt_number} {noun.pt_plural}",
        f"{subject.en} {_en_verb(have, subject, 'present', False)} {number[2]} {noun.en_plural}",
    )


SHAPES = [(action, 5), (location, 2), (description, 2), (question, 3), (phrase, 2)]


def pair(rng: random.Random) -> tuple[str, str]:
    """One (Portuguese, English) pair."""
    make = rng.choices([s for s, _ in SHAPES], [w for _, w in SHAPES])[0]
    return make(rng)
