//! The LLaVA-1.5 conversation template.
//!
//! `USER: <image>\n{prompt} ASSISTANT:` for the first turn; every answered turn is followed by
//! ` {answer}</s>` and the next turn starts with `USER: {prompt} ASSISTANT:`.

/// One exchange of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTurn {
    /// What the user said.
    pub user: String,
    /// The model's answer, `None` for the turn being generated.
    pub assistant: Option<String>,
}

/// Renders a whole conversation; the image placeholder goes into the first turn.
/// Ends with `ASSISTANT:` when the last turn is unanswered (the generation prompt).
pub fn render_llava15(turns: &[ChatTurn], has_image: bool) -> String {
    let mut out = String::new();
    for (i, turn) in turns.iter().enumerate() {
        out.push_str("USER: ");
        if i == 0 && has_image {
            out.push_str("<image>\n");
        }
        out.push_str(&turn.user);
        out.push_str(" ASSISTANT:");
        if let Some(answer) = &turn.assistant {
            out.push(' ');
            out.push_str(answer);
            out.push_str("</s>");
        }
    }
    out
}

/// The text of a follow-up turn, to be appended after the previous answer and its `</s>`
/// (encode it with [`crate::LlavaTokenizer::encode_continuation`] to get the ids a whole-
/// conversation render would have).
pub fn render_continuation(prompt: &str) -> String {
    format!("USER: {prompt} ASSISTANT:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_and_multi_turn() {
        let t1 = ChatTurn {
            user: "What is this?".into(),
            assistant: None,
        };
        assert_eq!(
            render_llava15(std::slice::from_ref(&t1), true),
            "USER: <image>\nWhat is this? ASSISTANT:"
        );
        let turns = [
            ChatTurn {
                user: "prompt1".into(),
                assistant: Some("answer1".into()),
            },
            ChatTurn {
                user: "prompt2".into(),
                assistant: None,
            },
        ];
        let full = render_llava15(&turns, true);
        assert_eq!(
            full,
            "USER: <image>\nprompt1 ASSISTANT: answer1</s>USER: prompt2 ASSISTANT:"
        );
        let first = render_llava15(&turns[..1], true);
        assert!(full.ends_with(&render_continuation("prompt2")));
        assert!(full.starts_with(&first));
        assert_eq!(
            render_llava15(&[t1], false),
            "USER: What is this? ASSISTANT:"
        );
    }
}
