//! Per-request facts that travel in extensions.

use std::fmt;
use std::sync::Arc;

/// Which backend served a response: a response extension set by [`Balance`](crate::Balance) on
/// every response, and carried by every [`BackendError`](crate::error::BackendError).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ServedBy {
    name: Arc<str>,
    index: usize,
}

impl ServedBy {
    pub(crate) fn new(name: Arc<str>, index: usize) -> Self {
        Self { name, index }
    }

    /// The backend's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend's configured name, shared (for a label or a log field that outlives the
    /// response).
    pub fn shared_name(&self) -> &Arc<str> {
        &self.name
    }

    /// The backend's position in the list `Balance` was built from.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl fmt::Debug for ServedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServedBy({:?}, {})", self.name, self.index)
    }
}

impl fmt::Display for ServedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// The backends already tried for one request: a request extension the retry policy keeps up to
/// date between attempts. [`Balance`](crate::Balance) picks an untried, available backend while
/// one exists, and otherwise goes on round-robin after the last one tried.
///
/// It tracks the first 128 backends; beyond that, a backend counts as untried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TriedBackends {
    mask: u128,
    last: Option<usize>,
    count: usize,
}

impl TriedBackends {
    /// An empty set.
    pub const fn new() -> Self {
        Self {
            mask: 0,
            last: None,
            count: 0,
        }
    }

    /// Records that the backend at `index` was tried (it becomes [`last`](Self::last)).
    pub fn insert(&mut self, index: usize) {
        if index < 128 {
            self.mask |= 1 << index;
        }
        self.last = Some(index);
        self.count += 1;
    }

    /// Whether the backend at `index` was tried.
    pub fn contains(&self, index: usize) -> bool {
        index < 128 && self.mask & (1 << index) != 0
    }

    /// The backend tried most recently.
    pub fn last(&self) -> Option<usize> {
        self.last
    }

    /// How many attempts were recorded (a backend tried twice counts twice).
    pub fn attempts(&self) -> usize {
        self.count
    }

    /// Whether no attempt was recorded: a request carrying a non-empty set is a retry (see
    /// [`BackendSnapshot::retries`](crate::BackendSnapshot::retries)).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// The deployment a request is for (an Azure OpenAI deployment, or the `model` of an
/// `/openai/v1` request), as the caller names it: a request extension set by a layer above
/// [`Balance`](crate::Balance).
///
/// With it, a 429 cools only the pair (backend, deployment), requests go only to backends that
/// offer the deployment ([`BackendSpec::deployments`](crate::BackendSpec::deployments)), and
/// "every backend is cooling down" is judged among those. A request without it is for any
/// deployment: every backend takes it, and a 429 cools the whole backend. Names are compared
/// exactly (case-sensitive).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Deployment(Arc<str>);

impl Deployment {
    /// The deployment named `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// Its name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Its name, shared.
    pub fn name(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Debug for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Deployment({:?})", &*self.0)
    }
}

impl fmt::Display for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for Deployment {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for Deployment {
    fn from(name: String) -> Self {
        Self::new(name)
    }
}

impl From<Arc<str>> for Deployment {
    fn from(name: Arc<str>) -> Self {
        Self(name)
    }
}

/// The backend a request must go to, by name: a request extension set by a layer above
/// [`Balance`](crate::Balance) for a request about an object that lives on one instance (a
/// stored response, a file, a thread).
///
/// [`Balance`](crate::Balance) sends such a request to that backend whatever its health (the
/// object is nowhere else; its own answer, a 429 say, is the caller's to see) and whether or not
/// it was tried. A name no backend has (the pool changed) is ignored: the request is picked as
/// any other.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PinnedTo(Arc<str>);

impl PinnedTo {
    /// Pins to the backend named `name`.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self(name.into())
    }

    /// The backend's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PinnedTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PinnedTo({:?})", &*self.0)
    }
}

/// A request extension: the request looks for an object that one backend holds (a stored
/// response, a file) and no layer above knows which. Once every backend that takes traffic was
/// tried, [`Balance`](crate::Balance) sends it to one not tried yet whatever its health: the
/// object may be on a backend cooling down, whose own answer (a 429, say) is truer than another
/// backend's "not found".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeekObject;
