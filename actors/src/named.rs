//! Enums whose variants each have a name: one table per enum, instead of
//! a hand-written `match` per direction.

/// Names the variants of a fieldless enum: `named!(Kind { A = "a", B = "b" })`.
/// The enum gets `ALL` (every variant, in the table's order), `as_str` (the
/// name), `from_name` (the variant of a name) and `Display` (the name). The
/// `match` in `as_str` makes sure that every variant has a name.
macro_rules! named {
    ($name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        impl $name {
            /// Every variant, in the order of its names' table.
            pub const ALL: [$name; [$($text),+].len()] = [$($name::$variant),+];

            /// Its name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            /// The variant named `name`, if any.
            pub fn from_name(name: &str) -> Option<$name> {
                $name::ALL.into_iter().find(|v| v.as_str() == name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
