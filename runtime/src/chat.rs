//! Chat templates: HF Jinja templates rendered with minijinja in an environment that behaves like
//! transformers' (`trim_blocks` and `lstrip_blocks` on, `raise_exception`, `strftime_now`, a `tojson` that
//! formats like Python's `json.dumps(ensure_ascii=False)`, Python string/dict methods, loop controls).

use crate::error::{Error, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind};
use std::fmt::Write as _;

/// The roles a [`Message`] may have (what HF chat templates of Llama-family models handle).
pub const ROLES: &[&str] = &["system", "user", "assistant"];

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message with this role and content.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A Jinja chat template with the special-token strings it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    /// Template source.
    pub source: String,
    /// `bos_token` as the template sees it.
    pub bos_token: String,
    /// `eos_token` as the template sees it.
    pub eos_token: String,
}

impl ChatTemplate {
    /// A template with its special-token strings.
    pub fn new(source: impl Into<String>, bos_token: impl Into<String>, eos_token: impl Into<String>) -> Self {
        ChatTemplate {
            source: source.into(),
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        }
    }

    /// Renders messages; `add_generation_prompt` opens an assistant turn. Template syntax errors and
    /// `raise_exception` calls give [`Error::Template`] with minijinja's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = hf_environment();
        let tmpl = env.template_from_str(&self.source).map_err(template_error)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(template_error)
    }
}

fn template_error(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let _ = write!(msg, ": {s}");
        source = s.source();
    }
    Error::Template(msg)
}

/// The environment transformers renders chat templates in.
fn hf_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function(
        "strftime_now",
        |fmt: String| -> std::result::Result<String, minijinja::Error> {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            strftime(secs, &fmt).map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
        },
    );
    env.add_filter(
        "tojson",
        |v: Value, kwargs: Kwargs| -> std::result::Result<String, minijinja::Error> {
            let indent: Option<usize> = kwargs.get("indent")?;
            let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
            let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
            kwargs.assert_all_used()?;
            let json = serde_json::to_value(&v)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
            let opts = PyJson {
                indent,
                ensure_ascii: ensure_ascii.unwrap_or(false),
                sort_keys: sort_keys.unwrap_or(false),
            };
            let mut out = String::new();
            opts.write(&mut out, &json, 0);
            Ok(out)
        },
    );
    env
}

/// `json.dumps` formatting (default separators `", "` / `": "`, or `","` + newline with `indent`).
struct PyJson {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    }

    fn write(&self, out: &mut String, v: &serde_json::Value, level: usize) {
        use serde_json::Value as J;
        let item_sep = if self.indent.is_some() { "," } else { ", " };
        match v {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => {
                if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                    // Python prints floats with a fractional part or exponent; ryu already does.
                    let s = n.to_string();
                    if f.is_finite() && !s.contains(['.', 'e', 'E']) {
                        let _ = write!(out, "{s}.0");
                    } else {
                        out.push_str(&s);
                    }
                } else {
                    let _ = write!(out, "{n}");
                }
            }
            J::String(s) => self.string(out, s),
            J::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    self.newline(out, level + 1);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push(']');
            }
            J::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_sep);
                    }
                    self.newline(out, level + 1);
                    self.string(out, k);
                    out.push_str(": ");
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push('}');
            }
        }
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A small `strftime` (UTC) for the directives chat templates use: `%Y %y %m %d %e %B %b %A %a %H %M %S %j %%`.
fn strftime(unix_secs: i64, fmt: &str) -> std::result::Result<String, String> {
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday (Monday = 0)
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('B') => write!(out, "{}", MONTHS[(month - 1) as usize]),
            Some('b') => write!(out, "{}", &MONTHS[(month - 1) as usize][..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('H') => write!(out, "{:02}", secs_of_day / 3600),
            Some('M') => write!(out, "{:02}", secs_of_day / 60 % 60),
            Some('S') => write!(out, "{:02}", secs_of_day % 60),
            Some('j') => write!(out, "{yday:03}"),
            Some('%') => write!(out, "%"),
            Some(d) => return Err(format!("strftime_now: unsupported directive %{d}")),
            None => return Err("strftime_now: format ends with %".into()),
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(src: &str) -> ChatTemplate {
        ChatTemplate::new(src, "<s>", "</s>")
    }

    #[test]
    fn trim_and_lstrip_blocks_like_jinja2() {
        // Expected strings from Python jinja2 3.1 with trim_blocks=True, lstrip_blocks=True.
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n<|user|>{{ m.content }}\n    {% else %}\n<|{{ m.role }}|>{{ m.content }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}";
        let msgs = [Message::new("system", "Be brief."), Message::new("user", "Hi")];
        assert_eq!(
            t(src).render(&msgs, true).unwrap(),
            "<|system|>Be brief.\n<|user|>Hi\n<|assistant|>\n"
        );
        assert_eq!(
            t(src).render(&msgs, false).unwrap(),
            "<|system|>Be brief.\n<|user|>Hi\n"
        );
        // Expression tags are not left-stripped, as in jinja2.
        let src = "{% for m in messages %}\n  {{ m.content }}\n{% endfor %}";
        assert_eq!(t(src).render(&msgs, false).unwrap(), "  Be brief.\n  Hi\n");
    }

    #[test]
    fn python_methods_and_special_tokens() {
        let src = "{{ bos_token }}{% for m in messages %}{{ m.content.strip().upper() }}|{{ m['role'].startswith('us') }}{% endfor %}{{ eos_token }}";
        let out = t(src).render(&[Message::new("user", "  hi there ")], false).unwrap();
        assert_eq!(out, "<s>HI THERE|True</s>");
    }

    #[test]
    fn raise_exception_is_a_template_error() {
        let src = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}ok";
        let err = t(src).render(&[Message::new("assistant", "x")], false).unwrap_err();
        match err {
            Error::Template(m) => assert!(m.contains("Conversation roles must alternate"), "{m}"),
            e => panic!("wrong error {e}"),
        }
        assert_eq!(t(src).render(&[Message::new("user", "x")], false).unwrap(), "ok");
    }

    #[test]
    fn syntax_error_is_a_template_error() {
        let err = t("{% for m in messages %}").render(&[], false).unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err}");
    }

    #[test]
    fn tojson_formats_like_python() {
        let src = "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}";
        let out = t(src).render(&[Message::new("user", "é \"q\"\n")], false).unwrap();
        assert_eq!(
            out,
            "[{\"role\": \"user\", \"content\": \"é \\\"q\\\"\\n\"}]|{\n  \"role\": \"user\",\n  \"content\": \"é \\\"q\\\"\\n\"\n}"
        );
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let s = strftime(1_709_211_909, "%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %e%%").unwrap();
        assert_eq!(s, "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 29%");
        assert_eq!(strftime(0, "%d %b %Y").unwrap(), "01 Jan 1970");
        assert!(strftime(0, "%Q").is_err());
        let out = t("{{ strftime_now('%Y') }}").render(&[], false).unwrap();
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn loop_controls() {
        let src = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}";
        let out = t(src)
            .render(&[Message::new("user", "a"), Message::new("user", "b")], false)
            .unwrap();
        assert_eq!(out, "a");
    }
}
