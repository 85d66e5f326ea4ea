//! The Ollama Modelfile written beside a merged GGUF, so that `ollama create NAME -f Modelfile`
//! is one command: `FROM` the GGUF, the chat template as Ollama's Go `TEMPLATE`, the recipe's
//! system message and few-shot turns as `SYSTEM` and `MESSAGE`s (the bot was trained on prompts
//! that hold them), its sampling as `PARAMETER`s, and `stop` at the end-of-turn text.
//!
//! The Go template is read off the model's own Jinja template: rendered around placeholder
//! contents, it shows what each role's turn puts before and after the content, and what the
//! generation prompt adds. A template that does not render turn by turn that way (one that
//! folds the system message into the first user turn, say) gets no `TEMPLATE`: Ollama then picks
//! one matching the GGUF's `tokenizer.chat_template` itself, and the file says so.

use crate::model::load::chat::{ChatTemplate, Message};
use crate::model::load::source::ModelMeta;
use std::fmt::Write;

/// What the Modelfile tells Ollama beyond the model: the recipe's sampling and its prompt.
#[derive(Debug, Clone)]
pub struct OllamaParams {
    pub temperature: f64,
    pub top_k: usize,
    pub top_p: f64,
    /// `generate.max_new_tokens`.
    pub num_predict: usize,
    /// transformers' repetition penalty; 1 is off.
    pub repetition_penalty: f64,
    pub frequency_penalty: f64,
    pub presence_penalty: f64,
    /// The system message and few-shot turns that come before the user's message.
    pub messages: Vec<Message>,
}

/// Placeholder contents, in a private-use area no template writes.
const SYS: &str = "\u{E000}system\u{E000}";
const U1: &str = "\u{E000}user1\u{E000}";
const A1: &str = "\u{E000}assistant1\u{E000}";
const U2: &str = "\u{E000}user2\u{E000}";

/// What a role's turn writes around its content, and what the generation prompt adds.
#[derive(Debug, PartialEq)]
struct Turns {
    system: (String, String),
    user: (String, String),
    assistant: (String, String),
    generation: String,
}

/// Read the turns off `chat` by rendering placeholder conversations, each one turn longer than
/// the one before; `None` when the renderings do not grow turn by turn.
fn turns(chat: &ChatTemplate) -> Option<Turns> {
    let m = Message::new;
    let r = |msgs: &[Message], gen| chat.render(msgs, gen).ok();
    let a = r(&[m("system", SYS), m("user", U1)], false)?;
    let b = r(&[m("system", SYS), m("user", U1)], true)?;
    let c = r(
        &[m("system", SYS), m("user", U1), m("assistant", A1)],
        false,
    )?;
    let d = r(
        &[
            m("system", SYS),
            m("user", U1),
            m("assistant", A1),
            m("user", U2),
        ],
        false,
    )?;
    let generation = b.strip_prefix(&a)?;
    let (a_pre, a_post) = c.strip_prefix(&a)?.split_once(A1)?;
    let (u_pre, u_post) = d.strip_prefix(&c)?.split_once(U2)?;
    let system = a.strip_suffix(&format!("{u_pre}{U1}{u_post}"))?;
    let (s_pre, s_post) = system.split_once(SYS)?;
    let t = Turns {
        system: (s_pre.into(), s_post.into()),
        user: (u_pre.into(), u_post.into()),
        assistant: (a_pre.into(), a_post.into()),
        generation: generation.into(),
    };
    let pieces = [
        &t.system.0,
        &t.system.1,
        &t.user.0,
        &t.user.1,
        &t.assistant.0,
        &t.assistant.1,
        &t.generation,
    ];
    // A placeholder left in a piece means the template wrote a content twice or elsewhere.
    if pieces.iter().any(|p| p.contains('\u{E000}')) {
        return None;
    }
    Some(t)
}

/// Text as a literal of a Go template (`{{` cannot appear bare).
fn go_literal(s: &str) -> String {
    s.replace("{{", "{{ \"{{\" }}")
}

/// The Go template Ollama renders a conversation with (`.Messages`, each `.Role` and
/// `.Content`), then the generation prompt. No `{{-`: it would trim the turns' own newlines.
fn go_template(t: &Turns, bos: Option<&str>) -> String {
    let mut system_pre = t.system.0.as_str();
    // llama.cpp (under Ollama) adds BOS itself where the GGUF says add_bos_token.
    if let Some(b) = bos.filter(|b| !b.is_empty()) {
        system_pre = system_pre.strip_prefix(b).unwrap_or(system_pre);
    }
    let turn = |role: &str, (pre, post): (&str, &str)| {
        format!(
            "{{{{ if eq .Role \"{role}\" }}}}{}{{{{ .Content }}}}{}{{{{ end }}}}",
            go_literal(pre),
            go_literal(post)
        )
    };
    format!(
        "{{{{ range .Messages }}}}{}{}{}{{{{ end }}}}{}",
        turn("system", (system_pre, &t.system.1)),
        turn("user", (&t.user.0, &t.user.1)),
        turn("assistant", (&t.assistant.0, &t.assistant.1)),
        go_literal(&t.generation)
    )
}

/// A Modelfile string: `"""` around it, the text unchanged but for a `"""` inside, which
/// would end it (Ollama has no escape there): a zero-width space goes between its quotes.
fn quoted(s: &str) -> String {
    format!("\"\"\"{}\"\"\"", s.replace("\"\"\"", "\"\u{200B}\"\""))
}

/// A number as Ollama reads it: no exponent, no trailing zeros.
fn num(x: f64) -> String {
    let s = format!("{x:.6}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The Modelfile for the GGUF file `gguf` (a name beside the Modelfile) of a model with
/// `meta`'s tokenizer and chat template.
pub fn modelfile(gguf: &str, meta: &ModelMeta, p: &OllamaParams) -> String {
    let mut f = String::new();
    let _ = writeln!(
        f,
        "# Ollama Modelfile, written by `pipeline merge-adapter --format gguf` beside {gguf}.\n\
         #   ollama create reviewer2 -f Modelfile\n\
         #   ollama run reviewer2 \"Attention Is All You Need\"\n\
         FROM ./{gguf}\n"
    );
    let tok = &meta.tok;
    let bos = tok.add_bos.then_some(tok.bos_token.as_str());
    match meta.chat.as_ref().and_then(turns) {
        Some(t) => {
            let _ = writeln!(
                f,
                "# The GGUF's chat template (tokenizer.chat_template), turn by turn.\nTEMPLATE {}\n",
                quoted(&go_template(&t, bos))
            );
        }
        None => {
            let _ = writeln!(
                f,
                "# No TEMPLATE: the chat template does not render turn by turn, so Ollama\n\
                 # chooses one matching the GGUF's tokenizer.chat_template.\n"
            );
        }
    }
    for m in &p.messages {
        let _ = match m.role.as_str() {
            "system" => writeln!(f, "SYSTEM {}", quoted(&m.content)),
            role => writeln!(f, "MESSAGE {role} {}", quoted(&m.content)),
        };
    }
    if !p.messages.is_empty() {
        f.push('\n');
    }
    let _ = writeln!(
        f,
        "# The recipe's sampling (generate.*).\n\
         PARAMETER temperature {}\nPARAMETER top_k {}\nPARAMETER top_p {}\nPARAMETER num_predict {}",
        num(p.temperature),
        p.top_k,
        num(p.top_p),
        p.num_predict
    );
    if p.repetition_penalty == 1.0 {
        let _ = writeln!(
            f,
            "# Ollama's default repeat_penalty is 1.1; the recipe has none.\nPARAMETER repeat_penalty 1"
        );
    } else {
        let _ = writeln!(
            f,
            "# The recipe's repetition_penalty counts the prompt and all the output: the whole context.\n\
             PARAMETER repeat_penalty {}\nPARAMETER repeat_last_n -1",
            num(p.repetition_penalty)
        );
    }
    for (k, v) in [
        ("frequency_penalty", p.frequency_penalty),
        ("presence_penalty", p.presence_penalty),
    ] {
        if v != 0.0 {
            let _ = writeln!(f, "PARAMETER {k} {}", num(v));
        }
    }
    let mut stops = vec![tok.eos_token.clone()];
    for &id in &tok.stop_ids {
        if let Ok(t) = tok.decode(&[id], false) {
            stops.push(t);
        }
    }
    stops.dedup();
    for s in stops.iter().filter(|s| !s.is_empty()) {
        let _ = writeln!(f, "PARAMETER stop {}", serde_json::Value::String(s.clone()));
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Render Ollama's Go template the way Ollama would for these few constructs.
    fn render_go(t: &Turns, msgs: &[Message]) -> String {
        let mut out = String::new();
        for m in msgs {
            let (pre, post) = match m.role.as_str() {
                "system" => &t.system,
                "user" => &t.user,
                _ => &t.assistant,
            };
            out += &format!("{pre}{}{post}", m.content);
        }
        out + &t.generation
    }

    fn check(source: &str, bos: &str, eos: &str) -> Turns {
        let chat = ChatTemplate::new(source, bos, eos, "test").unwrap();
        let t = turns(&chat).expect("turn by turn");
        let msgs = vec![
            Message::new("system", "Be harsh."),
            Message::new("user", "Title A"),
            Message::new("assistant", "Bad."),
            Message::new("user", "Title B"),
        ];
        assert_eq!(render_go(&t, &msgs), chat.render(&msgs, true).unwrap());
        t
    }

    #[test]
    fn chatml_and_zephyr_templates_become_go_templates() {
        let chatml = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = check(chatml, "<|im_start|>", "<|im_end|>");
        assert_eq!(t.user, ("<|im_start|>user\n".into(), "<|im_end|>\n".into()));
        assert_eq!(t.generation, "<|im_start|>assistant\n");
        let go = go_template(&t, None);
        assert!(go.starts_with("{{ range .Messages }}{{ if eq .Role \"system\" }}<|im_start|>system\n{{ .Content }}<|im_end|>\n{{ end }}"), "{go}");
        // TinyLlama's (Zephyr's), from reference.md.
        let zephyr = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";
        let t = check(zephyr, "<s>", "</s>");
        assert_eq!(t.system, ("<|system|>\n".into(), "</s>\n".into()));
        assert_eq!(t.generation, "<|assistant|>\n");
    }

    #[test]
    fn a_template_that_folds_the_system_turn_gets_none() {
        // Llama 2's: the system message inside the first user turn.
        let llama2 = "{% for message in messages %}{% if message['role'] == 'system' %}{% set sys = message['content'] %}{% elif message['role'] == 'user' %}{{ '[INST] ' + (('<<SYS>>\n' + sys + '\n<</SYS>>\n\n') if loop.index0 == 1 else '') + message['content'] + ' [/INST]' }}{% else %}{{ ' ' + message['content'] + ' </s>' }}{% endif %}{% endfor %}";
        let chat = ChatTemplate::new(llama2, "<s>", "</s>", "test").unwrap();
        assert_eq!(turns(&chat), None);
    }

    #[test]
    fn strings_and_numbers_are_written_as_ollama_reads_them() {
        assert_eq!(quoted("a\nb"), "\"\"\"a\nb\"\"\"");
        assert!(!quoted("x\"\"\"y")[3..]
            .trim_end_matches("\"\"\"")
            .contains("\"\"\""));
        assert_eq!(num(0.5), "0.5");
        assert_eq!(num(1.0), "1");
        assert_eq!(num(0.95), "0.95");
        assert_eq!(go_literal("a{{b"), "a{{ \"{{\" }}b");
    }
}
