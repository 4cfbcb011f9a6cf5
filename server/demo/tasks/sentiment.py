"""Portuguese reviews of products, films and restaurants, labelled `positivo` or `negativo`
(the `pt-sentiment` tenant).

A review opens with what was bought, watched or eaten, judges one to three aspects (each
judgement agreeing in gender with its aspect) and often closes with a verdict. Some reviews
praise one thing and fault another, with the overall label carried by the majority and the
verdict, so that a single word rarely decides. Labels are balanced.
"""

from __future__ import annotations

import random

POSITIVE, NEGATIVE = "positivo", "negativo"


def _g(spec: str) -> list[tuple[str, str]]:
    """'o celular/m; a tela/f' -> [("o celular", "m"), ("a tela", "f")] (gender, p for plural)."""
    return [tuple(item.strip().rsplit("/", 1)) for item in spec.split(";")]  # type: ignore[misc]


# what is reviewed and its aspects, with their genders, and how a review opens, per domain
DOMAINS: dict[str, dict[str, list[tuple[str, str]]]] = {
    "product": {
        "subjects": _g(
            "este fone de ouvido/m; o celular/m; esta cafeteira/f; o notebook/m; "
            "a mochila/f; este tênis/m; a cadeira de escritório/f; o aspirador/m; "
            "a geladeira/f; esta televisão/f; o liquidificador/m; a impressora/f; "
            "este relógio/m; a bicicleta/f; o colchão/m"
        ),
        "aspects": _g(
            "a bateria/f; a tela/f; o som/m; a entrega/f; o preço/m; a qualidade/f; "
            "o material/m; o acabamento/m; a embalagem/f; o tamanho/m; o manual/m; "
            "a garantia/f"
        ),
        "openers": ["Comprei {s} na semana passada.", "Recebi {s} ontem.", "Uso {s} há um mês.",
                    "Ganhei {s} de presente.", "Comprei {s} pela internet."],
    },
    "film": {
        "subjects": _g(
            "o filme/m; a série/f; o documentário/m; a novela/f; a comédia/f; "
            "o desenho animado/m; o novo filme de terror/m; a peça de teatro/f; o musical/m"
        ),
        "aspects": _g(
            "o roteiro/m; a atuação/f; a fotografia/f; o final/m; a trilha sonora/f; "
            "os efeitos especiais/mp; a direção/f; o ritmo/m; os diálogos/mp; o elenco/m; "
            "a história/f"
        ),
        "openers": ["Assisti {s} ontem.", "Vi {s} no fim de semana.", "Fui ver {s} com minha família.",
                    "Terminei {s} hoje.", "Assisti {s} no cinema.", "Vi {s} por indicação de um amigo."],
    },
    "restaurant": {
        "subjects": _g(
            "o restaurante/m; a pizzaria/f; o café da esquina/m; a churrascaria/f; "
            "o bar do centro/m; a lanchonete/f; o restaurante japonês/m; a padaria nova/f; "
            "o bistrô/m"
        ),
        "aspects": _g(
            "a comida/f; o atendimento/m; os garçons/mp; a sobremesa/f; o ambiente/m; "
            "o preço/m; a carne/f; o café/m; a música/f; as porções/fp; a limpeza/f"
        ),
        "openers": ["Jantei {s_em} no sábado.", "Almocei {s_em} hoje.", "Fui {s_a} com meus amigos.",
                    "Fomos {s_a} para comemorar um aniversário.", "Pedi comida {s_de} ontem à noite."],
    },
}  # fmt: skip

# judgements: masculine singular form (feminine and plural derived where marked with *)
GOOD = ["é excelente", "é ótim*", "é maravilhos*", "estava perfeit*", "é muito bem feit*", "é incrível",
        "superou minhas expectativas", "vale cada centavo", "é de primeira", "é impecável",
        "me surpreendeu", "é nota dez", "estava delicios*", "é muito agradável"]  # fmt: skip
BAD = ["é péssim*", "é horrível", "deixou muito a desejar", "é frac*", "é uma decepção", "é muito ruim",
       "estava terrível", "é car* demais", "não vale o preço", "é medíocre", "me decepcionou",
       "estava fri*", "é lent*", "é confus*"]  # fmt: skip
# Judgements that only fit some aspects (food is delicious, a plot is confusing).
ONLY = {
    "estava delicios*": "restaurant",
    "estava fri*": "restaurant",
    "é confus*": "film",
    "é car* demais": "product",
}
GOOD_VERDICTS = ["Recomendo muito!", "Voltaria com certeza.", "Nota dez.", "Adorei!", "Vale a pena.",
                 "Compraria de novo.", "Superou tudo o que eu esperava.", "Recomendo para todos.",
                 "Estou muito satisfeito.", "Uma ótima experiência."]  # fmt: skip
BAD_VERDICTS = ["Não recomendo.", "Nunca mais volto.", "Dinheiro jogado fora.", "Que decepção.",
                "Não compraria de novo.", "Me arrependi.", "Fuja!", "Uma experiência ruim.",
                "Estou muito insatisfeito.", "Perdi meu tempo."]  # fmt: skip
# Singular -> plural of the words of judgements, for plural aspects ("os garçons").
PLURAL_WORDS = {
    "é": "são", "estava": "estavam", "superou": "superaram", "deixou": "deixaram",
    "surpreendeu": "surpreenderam", "decepcionou": "decepcionaram", "vale": "valem",
    "incrível": "incríveis", "horrível": "horríveis",
    "terrível": "terríveis", "impecável": "impecáveis", "agradável": "agradáveis", "excelente": "excelentes",
    "medíocre": "medíocres", "ruim": "ruins",
}  # fmt: skip
PLAIN_GOOD = ["Gostei muito.", "Fiquei feliz com a escolha.", "Tudo funcionou bem."]
PLAIN_BAD = ["Não gostei.", "Fiquei bem chateado.", "Nada funcionou direito."]


def _agree(judgement: str, gender: str) -> str:
    """'é ótim*' for 'a tela' -> 'é ótima'; for 'os diálogos' -> 'são ótimos'."""
    plural = gender.endswith("p")
    text = judgement.replace("*", ("a" if gender.startswith("f") else "o") + ("s" if plural else ""))
    if plural:
        text = " ".join(PLURAL_WORDS.get(word, word) for word in text.split())
    return text


def _judgements(domain: str, good: bool) -> list[str]:
    return [j for j in (GOOD if good else BAD) if ONLY.get(j, domain) == domain]


def _opener(rng: random.Random, domain: str, subject: tuple[str, str]) -> str:
    text, _ = subject
    article, rest = text.split(" ", 1)
    merged = {"o": ("no", "ao", "do"), "a": ("na", "à", "da")}.get(article)
    forms = {"s": text}
    if merged:
        forms |= {"s_em": f"{merged[0]} {rest}", "s_a": f"{merged[1]} {rest}", "s_de": f"{merged[2]} {rest}"}
    return rng.choice(DOMAINS[domain]["openers"]).format(**forms)


def review(rng: random.Random, label: str) -> str:
    """One review whose overall sentiment is `label`."""
    domain = rng.choice(list(DOMAINS))
    spec = DOMAINS[domain]
    subject = rng.choice(spec["subjects"])
    good = label == POSITIVE
    aspects = rng.sample(spec["aspects"], rng.choice([1, 2, 2, 3]))
    # With two or three aspects, one may go against the overall label ("mas" / "pena que").
    against = len(aspects) > 1 and rng.random() < 0.4
    clauses = []
    for i, (aspect, gender) in enumerate(aspects):
        this_good = good if not (against and i == len(aspects) - 1) else not good
        clause = f"{aspect} {_agree(rng.choice(_judgements(domain, this_good)), gender)}"
        clauses.append(clause)
    parts = []
    if rng.random() < 0.7:
        parts.append(_opener(rng, domain, subject))
    body = clauses[0]
    for clause in clauses[1:-1]:
        body += f", {clause}"
    if len(clauses) > 1:
        joiner = rng.choice([" mas ", ", pena que ", ", só que "]) if against else rng.choice([" e ", ", e "])
        body += joiner + clauses[-1]
    parts.append(body[0].upper() + body[1:] + ".")
    if against or rng.random() < 0.7:  # a mixed review always says where it lands
        verdicts = (GOOD_VERDICTS + PLAIN_GOOD) if good else (BAD_VERDICTS + PLAIN_BAD)
        parts.append(rng.choice(verdicts))
    return " ".join(parts)


def pair(rng: random.Random) -> tuple[str, str]:
    """One (review, label) pair; labels alternate by coin flip, balanced over a data set."""
    label = POSITIVE if rng.random() < 0.5 else NEGATIVE
    return review(rng, label), label
