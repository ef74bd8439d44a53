//! Documents with known answers for MinionS: the bundled synthetic annual report with its
//! questions, and generated reports of any length with facts placed once each.

use serde::Serialize;

/// The bundled synthetic annual report (28 KB) with facts placed in it.
pub const NORTHPORT: &str = include_str!("../../ops/data/northport-annual-report-2025.txt");

/// Questions about [`NORTHPORT`], each with the strings a correct answer contains (any one,
/// lowercase), in the order their facts appear.
const QUESTIONS: [(&str, &[&str]); 4] = [
    (
        "How many tonnes of cargo did the port handle in 2025?",
        &["14.2"],
    ),
    ("How much tariff revenue did the port earn?", &["61.5"]),
    (
        "Who succeeded the harbour master when she retired?",
        &["reyes"],
    ),
    (
        "Which terminal was closed for repairs in 2025?",
        &["north quay"],
    ),
];

/// A document and the questions asked about it.
#[derive(Clone, Debug, Serialize)]
pub struct Corpus {
    pub name: String,
    #[serde(skip)]
    pub text: String,
    pub chars: usize,
    pub metadata: String,
    pub questions: Vec<(String, Vec<String>)>,
}

// The generated report's vocabulary.
const SUBJECTS: [&str; 12] = [
    "Crane maintenance",
    "Berth scheduling",
    "Night shifts",
    "Yard congestion",
    "Pilotage",
    "Tug availability",
    "Lease income",
    "Debt service",
    "Operating costs",
    "Insurance premiums",
    "Dredging works",
    "Staff training",
];
const VERBS: [&str; 6] = [
    "was reviewed by",
    "was discussed with",
    "was reported to",
    "was audited by",
    "was planned together with",
    "remained a priority for",
];
const BODIES: [&str; 6] = [
    "the harbour board",
    "the safety committee",
    "the terminal operators",
    "external auditors",
    "the city council",
    "the regional transport office",
];
const ENDINGS: [&str; 5] = [
    "with no major findings",
    "and the results were published internally",
    "although several minor issues were noted",
    "in line with the previous year",
    "and a follow-up was scheduled for the next quarter",
];
const SECTIONS: [&str; 5] = [
    "OPERATIONS",
    "FINANCE",
    "PEOPLE",
    "INFRASTRUCTURE",
    "OUTLOOK",
];
const NAMES: [&str; 6] = ["Ana", "Tomas", "Ingrid", "Kofi", "Mei", "Rafael"];
const SURNAMES: [&str; 6] = [
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Castillo",
    "Brennan",
];
const TERMINALS: [&str; 5] = [
    "Eastern Basin",
    "Harbour Gate",
    "Pier Seven",
    "Riverside",
    "Old Mole",
];

impl Corpus {
    /// The report's first `chars` characters (cut at a paragraph) and the first `questions`
    /// questions whose facts lie inside them.
    pub fn northport(chars: usize, questions: usize) -> Corpus {
        let mut text = NORTHPORT;
        if chars < text.len() {
            let cut = text[..chars].rfind("\n\n").unwrap_or(chars);
            text = &text[..cut];
        }
        let lower = text.to_lowercase();
        let questions: Vec<(String, Vec<String>)> = QUESTIONS
            .iter()
            .filter(|(_, e)| e.iter().all(|e| lower.contains(e)))
            .take(questions)
            .map(|(q, e)| (q.to_string(), e.iter().map(|s| s.to_string()).collect()))
            .collect();
        Corpus {
            name: if text.len() == NORTHPORT.len() {
                "Northport annual report 2025".into()
            } else {
                format!(
                    "Northport annual report 2025, first {} characters",
                    text.len()
                )
            },
            chars: text.len(),
            text: text.to_string(),
            metadata: "Annual report of a harbour authority, 2025".into(),
            questions,
        }
    }
}

/// splitmix64: the generator's seeded randomness (reproducible, no dependency).
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

impl Corpus {
    /// A report of about `chars` characters made from `seed`: sections of routine
    /// paragraphs (the bundled report's vocabulary, no figures in them) with four facts
    /// planted at seeded places, one per question. The same seed gives the same text; a
    /// report longer than the supervisor's context is one that remote-only cannot ask.
    pub fn generated(chars: usize, seed: u64) -> Corpus {
        let mut r = Seeded(seed);
        let tonnes = format!("{}.{}", 10 + r.below(40), 1 + r.below(9));
        let revenue = format!("{}.{}", 50 + r.below(40), 1 + r.below(9));
        let (name, surname) = (r.pick(&NAMES), r.pick(&SURNAMES));
        let terminal = r.pick(&TERMINALS);
        let facts = [
            (
                format!("In 2025 the port handled a total of {tonnes} million tonnes of cargo."),
                "How many tonnes of cargo did the port handle in 2025?",
                tonnes.clone(),
            ),
            (
                format!("Tariff revenue reached {revenue} million euros in 2025."),
                "How much tariff revenue did the port earn?",
                revenue.clone(),
            ),
            (
                format!("When the harbour master retired in June, {name} {surname} succeeded her."),
                "Who succeeded the harbour master when she retired?",
                surname.to_lowercase(),
            ),
            (
                format!("The {terminal} terminal was closed for repairs for most of 2025."),
                "Which terminal was closed for repairs in 2025?",
                terminal.to_lowercase(),
            ),
        ];
        // Paragraphs of four to six sentences; each fact goes into a seeded paragraph of
        // its fifth of the report.
        let paragraph = |r: &mut Seeded| {
            let n = 4 + r.below(3);
            (0..n)
                .map(|_| {
                    format!(
                        "{} {} {} {}.",
                        r.pick(&SUBJECTS),
                        r.pick(&VERBS),
                        r.pick(&BODIES),
                        r.pick(&ENDINGS)
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut paragraphs = Vec::new();
        let mut len = 0;
        while len < chars.max(2_000) {
            let p = paragraph(&mut r);
            len += p.len() + 2;
            paragraphs.push(p);
        }
        let n = paragraphs.len();
        for (i, (fact, _, _)) in facts.iter().enumerate() {
            let at = (i * n) / facts.len() + r.below((n / facts.len()).max(1));
            let p = &mut paragraphs[at.min(n - 1)];
            let cut = p.find(". ").map_or(p.len(), |c| c + 2);
            p.insert_str(cut, &format!("{fact} "));
        }
        let per_section = n.div_ceil(SECTIONS.len());
        let mut text = String::from("NORTHPORT HARBOUR AUTHORITY - ANNUAL REPORT 2025 (generated)");
        for (i, p) in paragraphs.iter().enumerate() {
            if i % per_section == 0 {
                text.push_str(&format!("\n\n{}", SECTIONS[i / per_section]));
            }
            text.push_str("\n\n");
            text.push_str(p);
        }
        text.push('\n');
        Corpus {
            name: format!("generated report, seed {seed}"),
            chars: text.len(),
            text,
            metadata: "Annual report of a harbour authority, 2025".into(),
            questions: facts
                .iter()
                .map(|(_, q, a)| (q.to_string(), vec![a.clone()]))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortened_report_asks_only_what_it_contains() {
        let whole = Corpus::northport(usize::MAX, 9);
        assert_eq!(whole.questions.len(), 4);
        assert_eq!(whole.chars, NORTHPORT.len());
        let short = Corpus::northport(8_300, 9);
        assert!(short.chars <= 8_300 && short.text.ends_with('.'));
        assert_eq!(short.questions.len(), 2);
        for (_, expect) in &short.questions {
            assert!(short.text.to_lowercase().contains(&expect[0]));
        }
        assert_eq!(Corpus::northport(8_300, 1).questions.len(), 1);
    }

    #[test]
    fn a_generated_report_holds_each_fact_once_and_is_reproducible() {
        for size in [30_000, 300_000] {
            let c = Corpus::generated(size, 7);
            assert!(c.chars >= size && c.chars < size + 2_000, "{}", c.chars);
            assert_eq!(c.questions.len(), 4);
            for (q, expect) in &c.questions {
                let hits = c.text.to_lowercase().matches(expect[0].as_str()).count();
                assert_eq!(hits, 1, "{q}: {:?} found {hits} times", expect[0]);
            }
            assert_eq!(Corpus::generated(size, 7).text, c.text);
            assert_ne!(Corpus::generated(size, 8).text, c.text);
        }
    }
}
