//! User labels: the operator knows what the kernel cannot (that a USB
//! ethernet dongle is a phone tether), and says so by interface name or
//! glob: `"enx*" = "wwan"`.

use super::LinkKind;

/// The kind the first label whose glob matches `name` gives, if any.
pub fn label_of(labels: &[(String, LinkKind)], name: &str) -> Option<LinkKind> {
    labels
        .iter()
        .find(|(glob, _)| glob_matches(glob, name))
        .map(|&(_, kind)| kind)
}

/// Shell-style matching of a whole name: `*` matches any run of characters
/// (also none), `?` exactly one; every other character matches itself.
pub fn glob_matches(glob: &str, name: &str) -> bool {
    let glob: Vec<char> = glob.chars().collect();
    let name: Vec<char> = name.chars().collect();
    let (mut g, mut n) = (0, 0);
    // Where the last `*` was, and the first name position it has not yet
    // swallowed: on a mismatch the star takes one more character. Going
    // back to the last star only is enough (classic wildcard matching).
    let mut last_star: Option<(usize, usize)> = None;
    while n < name.len() {
        match glob.get(g) {
            Some('*') => {
                last_star = Some((g, n));
                g += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                g += 1;
                n += 1;
            }
            _ => match last_star {
                Some((star, swallowed)) => {
                    last_star = Some((star, swallowed + 1));
                    g = star + 1;
                    n = swallowed + 1;
                }
                None => return false,
            },
        }
    }
    glob[g..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_globs_match_only_the_same_name() {
        assert!(glob_matches("eth0", "eth0"));
        assert!(!glob_matches("eth0", "eth1"));
        assert!(!glob_matches("eth0", "eth00"));
        assert!(!glob_matches("eth00", "eth0"));
        assert!(glob_matches("", ""));
        assert!(!glob_matches("", "x"));
        assert!(!glob_matches("x", ""));
    }

    #[test]
    fn star_matches_any_run_including_none() {
        assert!(glob_matches("enx*", "enx00e04c680001"));
        assert!(glob_matches("enx*", "enx"));
        assert!(!glob_matches("enx*", "en"));
        assert!(!glob_matches("enx*", "wlan0"));
        assert!(glob_matches("*", ""));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("**", "a"));
        assert!(glob_matches("*0", "wlp2s0"));
        assert!(!glob_matches("*0", "wlp2s1"));
        assert!(glob_matches("veth-*-eth*", "veth-b1-eth0"));
    }

    #[test]
    fn question_mark_matches_exactly_one_character() {
        assert!(glob_matches("eth?", "eth0"));
        assert!(!glob_matches("eth?", "eth"));
        assert!(!glob_matches("eth?", "eth10"));
        assert!(glob_matches("?*", "a"));
        assert!(!glob_matches("?*", ""));
        assert!(glob_matches("wl?é", "wlxé"));
    }

    #[test]
    fn stars_backtrack() {
        assert!(glob_matches("a*b*c", "aXbYbZc"));
        assert!(glob_matches("a*bc", "abcbc"));
        assert!(!glob_matches("a*b*c", "aXbYbZ"));
        assert!(glob_matches("*ab", "aab"));
        assert!(glob_matches("*a?b", "xaaab"));
        assert!(!glob_matches("*a?b", "xab"));
    }

    #[test]
    fn the_first_matching_label_wins() {
        let labels = vec![
            ("veth-eth*".to_owned(), LinkKind::Ethernet),
            ("veth-*".to_owned(), LinkKind::Wifi),
            ("enx*".to_owned(), LinkKind::Wwan),
        ];
        assert_eq!(label_of(&labels, "veth-eth0"), Some(LinkKind::Ethernet));
        assert_eq!(label_of(&labels, "veth-wifi0"), Some(LinkKind::Wifi));
        assert_eq!(label_of(&labels, "enx00e04c680001"), Some(LinkKind::Wwan));
        assert_eq!(label_of(&labels, "eth0"), None);
        assert_eq!(label_of(&[], "eth0"), None);
    }
}
