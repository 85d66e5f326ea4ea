//! prompts: templates and the models' own chat templates render exactly what HF renders.

use crate::support::*;
use reviewer2::model::load::chat::{ChatTemplate, Message};

/// TinyLlama-1.1B-Chat-v1.0's chat_template, as its tokenizer_config.json holds it.
const TINYLLAMA: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

#[test]
fn tinyllama_template_renders_exactly() {
    let t = ChatTemplate::new(TINYLLAMA, "<s>", "</s>", "tinyllama").unwrap();
    let msgs = vec![
        Message::new("system", "SYS"),
        Message::new("user", "T1"),
        Message::new("assistant", "R1"),
        Message::new("user", "T"),
    ];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|system|>\nSYS</s>\n<|user|>\nT1</s>\n<|assistant|>\nR1</s>\n<|user|>\nT</s>\n<|assistant|>\n"
    );
}

#[test]
fn template_errors_and_raise_exception_are_reported() {
    let t = ChatTemplate::new("{{ raise_exception('only user turns') }}", "", "", "x").unwrap();
    let e = format!("{:#}", t.render(&[], true).unwrap_err());
    assert!(e.contains("only user turns"), "{e}");
    let e = ChatTemplate::new("{% for %}", "", "", "model.gguf")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.gguf"), "{e}");
    // pycompat string methods that HF templates use
    let t = ChatTemplate::new(
        "{{ messages[0]['content'].strip().startswith('a') }}",
        "",
        "",
        "x",
    )
    .unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "  abc ")], false).unwrap(),
        "True"
    );
}

/// A TinyLlama-style model folder (tokenizer + chat template) for the prompts stage.
fn tinyllama_folder(dir: &std::path::Path) {
    let meta = smollm2_meta();
    std::fs::create_dir_all(dir).unwrap();
    meta.tok
        .inner
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    let tc = serde_json::json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TINYLLAMA});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let cfg = reviewer2::model::config::LlamaConfig {
        num_hidden_layers: 1,
        hidden_size: 32,
        intermediate_size: 32,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 16,
        // The tokenizer is SmolLM2's: the embedding must have a row for each of its tokens.
        vocab_size: meta.tok.inner.get_vocab_size(true),
        ..reviewer2::model::config::LlamaConfig::tinyllama()
    };
    std::fs::write(dir.join("config.json"), cfg.to_hf_json().to_string()).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"not needed for prompts").unwrap();
}

#[test]
fn prompts_stage_builds_chat_and_plain_prompts() {
    let d = tempdir();
    small_recipe(d.path(), 4, 3, 1, 8, "");
    let model = d.path().join("tiny");
    tinyllama_folder(&model);
    let out = pipeline_ok(
        d.path(),
        &[
            "run",
            "--until",
            "prompts",
            "--set",
            &format!("generate.model={}", model.display()),
        ],
    );
    assert!(out.contains("Built prompts"), "{out}");
    let dir = only_build(&d.path().join("data/cache/prompts"));
    let rows = read_jsonl(&dir.join("prompts.jsonl"));
    assert_eq!(rows.len(), 8);
    let neg = &rows[0];
    assert_eq!(neg["polarity"], "negative");
    let p = neg["prompt"].as_str().unwrap();
    let sys = reviewer2::config::SYSTEM_MESSAGE;
    assert!(
        p.starts_with(&format!("<|system|>\n{sys}<|im_end|>\n<|user|>\n")),
        "{p}"
    );
    assert!(
        p.ends_with(&format!(
            "<|user|>\n{}<|im_end|>\n<|assistant|>\n",
            neg["title"].as_str().unwrap()
        )),
        "{p}"
    );
    assert_eq!(
        p.matches("<|assistant|>\n").count(),
        4,
        "3 shots + generation prompt: {p}"
    );
    // Negative prompts show only negative examples; the pair prompt mixes both.
    let pool = reviewer2::config::default_pool();
    assert!(
        pool.iter().any(|s| p.contains(s.review("negative")))
            && !pool.iter().any(|s| p.contains(s.review("positive")))
    );
    let pairs = read_jsonl(&dir.join("pair_prompts.jsonl"));
    let pp = pairs[0]["prompt"].as_str().unwrap();
    assert!(
        pool.iter().any(|s| pp.contains(s.review("negative")))
            && pool.iter().any(|s| pp.contains(s.review("positive"))),
        "{pp}"
    );
    assert!(!pp.contains("negative") && !pp.contains("positive"));

    // Plain style: the blog's text, as one user turn.
    pipeline_ok(
        d.path(),
        &[
            "run",
            "--until",
            "prompts",
            "--set",
            &format!("generate.model={}", model.display()),
            "--set",
            "prompts.style=\"plain\"",
            "--set",
            "prompts.shots=2",
        ],
    );
    let dir = latest_build(&d.path().join("data"), "prompts");
    let rows = read_jsonl(&dir.join("prompts.jsonl"));
    let t = rows[0]["title"].as_str().unwrap();
    let p = rows[0]["prompt"].as_str().unwrap();
    let re = format!("<|user|>\nGenerate a negative review about the paper {t}.\nExample 1: ");
    assert!(
        p.starts_with(&re)
            && p.contains("\nExample 2: ")
            && p.ends_with("\nYour review:<|im_end|>\n<|assistant|>\n"),
        "{p}"
    );
    let pairs = read_jsonl(&dir.join("pair_prompts.jsonl"));
    assert!(pairs[0]["prompt"]
        .as_str()
        .unwrap()
        .contains(&format!("Generate a review about the paper {t}.")));
}

#[test]
fn smollm2_gguf_template_renders_prompts() {
    let d = tempdir();
    small_recipe(d.path(), 2, 1, 1, 8, "");
    pipeline_ok(d.path(), &["run", "--until", "prompts"]);
    let dir = only_build(&d.path().join("data/cache/prompts"));
    let rows = read_jsonl(&dir.join("prompts.jsonl"));
    let p = rows[1]["prompt"].as_str().unwrap();
    assert_eq!(rows[1]["polarity"], "positive");
    assert!(
        p.starts_with("<|im_start|>system\nYou are an experienced researcher")
            && p.ends_with("<|im_end|>\n<|im_start|>assistant\n"),
        "{p}"
    );
}

#[test]
fn a_broken_template_names_file_and_line() {
    let d = tempdir();
    small_recipe(d.path(), 2, 1, 1, 8, "");
    std::fs::write(
        d.path().join("templates/chat_user.jinja"),
        "{{ title }}\n{{ title | nosuchfilter }}\n",
    )
    .unwrap();
    let o = pipeline(d.path(), &["run", "--until", "prompts"]);
    let e = stderr_of(&o);
    assert!(
        !o.status.success() && e.contains("chat_user.jinja:2"),
        "{e}"
    );
}
