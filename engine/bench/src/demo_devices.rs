//! The multi-device half of `keel demo`: three `keel serve` processes on 127.0.0.1 with their
//! own homes. B and C pair with codes; C is cut off and annotates offline while B tags; the
//! leader A is killed (`kill -9`); B or C takes over in a new epoch; A comes back and steps down;
//! everyone converges to one digest.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::demo::{step, PASSWORD};

/// How long the demo waits for the devices to agree.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

struct Device {
    label: &'static str,
    home: PathBuf,
    addr: SocketAddr,
    serve: Option<Child>,
}

fn keel() -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe().context("locating the keel binary")?);
    cmd.env("KEEL_PASSWORD", PASSWORD).env_remove("KEEL_HOME");
    if std::env::var_os("KEEL_LOG").is_none() {
        cmd.env("KEEL_LOG", "warn");
    }
    Ok(cmd)
}

fn free_addr() -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?)
}

impl Device {
    fn new(root: &Path, label: &'static str) -> Result<Self> {
        Ok(Self {
            label,
            home: root.join(label.to_ascii_lowercase()),
            addr: free_addr()?,
            serve: None,
        })
    }

    /// Runs a `keel` command on this device (through its node when it serves) and returns stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        let out = keel()?
            .arg("--home")
            .arg(&self.home)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{}: keel {} failed: {}",
                self.label,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn socket(&self) -> PathBuf {
        self.home.join("libraries/demo.keel/control.sock")
    }

    fn serve(&mut self, peers: &[SocketAddr]) -> Result<()> {
        // A socket left by a killed node would send our commands to nobody; the new node
        // creates its own once it holds the library.
        let _ = std::fs::remove_file(self.socket());
        let mut cmd = keel()?;
        cmd.arg("--home").arg(&self.home).args([
            "serve",
            "demo",
            "--listen",
            &self.addr.to_string(),
            // Every device of the demo is on this machine: they find each other on loopback.
            "--mdns-loopback",
        ]);
        for p in peers {
            cmd.args(["--peer", &p.to_string()]);
        }
        // The node's log goes to <home>/serve.log.
        std::fs::create_dir_all(&self.home)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.home.join("serve.log"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.serve = Some(child);
        // Ready once its control socket answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket().exists() || self.status().is_err() {
            if Instant::now() > deadline {
                bail!("{}: the node did not start", self.label);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn status(&self) -> Result<Value> {
        if self.serve.is_some() && !self.socket().exists() {
            bail!("not serving yet");
        }
        Ok(serde_json::from_str(
            &self.run(&["status", "demo", "--json"])?,
        )?)
    }

    /// Stops the node: SIGTERM (clean) or SIGKILL.
    fn stop(&mut self, kill: bool) -> Result<()> {
        if let Some(mut child) = self.serve.take() {
            if kill {
                child.kill()?;
            } else {
                let pid = child.id().to_string();
                Command::new("kill").args(["-TERM", &pid]).status()?;
            }
            child.wait()?;
        }
        Ok(())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(mut child) = self.serve.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn epoch_of(status: &Value) -> String {
    format!(
        "epoch {} led by {}",
        status["epoch"]["counter"],
        status["epoch"]["device"]
            .as_str()
            .and_then(|d| d.get(..8))
            .unwrap_or("?")
    )
}

fn str_of<'a>(status: &'a Value, key: &str) -> &'a str {
    status[key].as_str().unwrap_or("")
}

/// Waits until the serving devices agree (same digest and log, nothing to push, one leader)
/// and each has a session with every other.
fn converge(devices: &[&Device]) -> Result<Vec<Value>> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    loop {
        let statuses: Vec<Value> = devices.iter().map(|d| d.status()).collect::<Result<_>>()?;
        let first = &statuses[0];
        let agreed = statuses.iter().all(|s| {
            let peers = s["peers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let linked = peers.iter().filter(|p| p["connected"] == true).count();
            linked + 1 >= devices.len()
                && s["digest"] == first["digest"]
                && s["journal"]["log_len"] == first["journal"]["log_len"]
                && s["offline"] == 0
                && s["leader"] == first["leader"]
                && !s["leader"].is_null()
        });
        if agreed {
            return Ok(statuses);
        }
        if Instant::now() > deadline {
            for (d, s) in devices.iter().zip(&statuses) {
                println!(
                    "    {}: {} {} digest {}",
                    d.label,
                    str_of(s, "role"),
                    epoch_of(s),
                    str_of(s, "digest")
                );
            }
            bail!("the devices did not converge in {CONVERGE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn show_roles(devices: &[&Device], statuses: &[Value]) {
    for (d, s) in devices.iter().zip(statuses) {
        println!(
            "    {}: {:<9} {}  log {}",
            d.label,
            str_of(s, "role"),
            epoch_of(s),
            s["journal"]["log_len"]
        );
    }
}

/// Polls `devices` until one leads an epoch above `old_epoch`.
fn wait_new_leader(devices: &[&Device], old_epoch: u64) -> Result<(&'static str, Value)> {
    let start = Instant::now();
    loop {
        for d in devices {
            let s = d.status()?;
            if str_of(&s, "role") == "leader"
                && s["epoch"]["counter"].as_u64().unwrap_or(0) > old_epoch
            {
                return Ok((d.label, s));
            }
        }
        if start.elapsed() > CONVERGE_TIMEOUT {
            for d in devices {
                let s = d.status()?;
                println!(
                    "    {}: {} {} peers {}",
                    d.label,
                    str_of(&s, "role"),
                    epoch_of(&s),
                    s["peers"]
                );
            }
            bail!("no device took over after the leader was killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `x` and `y` have a session with each other (they learn each other's address
/// from a third device).
fn wait_connected(x: &Device, y: &Device) -> Result<()> {
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    let id = |d: &Device| -> Result<String> { Ok(str_of(&d.status()?, "device_id").to_string()) };
    let (x_id, y_id) = (id(x)?, id(y)?);
    loop {
        let sees = |d: &Device, other: &str| -> bool {
            d.status().ok().is_some_and(|s| {
                s["peers"].as_array().is_some_and(|peers| {
                    peers
                        .iter()
                        .any(|p| p["device_id"] == other && p["connected"] == true)
                })
            })
        };
        if sees(x, &y_id) && sees(y, &x_id) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} and {} never reached each other", x.label, y.label);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// For `keel bench` (P6): three nodes on the library `demo` in `root/a`, the leader killed;
/// milliseconds until another device leads a new epoch.
pub(crate) fn failover_ms(root: &Path) -> Result<f64> {
    let mut a = Device::new(root, "A")?;
    let mut b = Device::new(root, "B")?;
    let mut c = Device::new(root, "C")?;
    a.serve(&[])?;
    for joiner in [&mut b, &mut c] {
        let code = a.run(&["pair", "invite", "demo", "--yes"])?;
        let code = code.lines().next().unwrap_or("").trim().to_string();
        let addr = a.addr.to_string();
        joiner.run(&["pair", "join", "--addr", &addr, "--code", &code])?;
    }
    // No --peer: B and C learn of each other from A.
    b.serve(&[])?;
    c.serve(&[])?;
    converge(&[&a, &b, &c])?;
    wait_connected(&b, &c)?;
    let old_epoch = a.status()?["epoch"]["counter"].as_u64().unwrap_or(0);
    a.stop(true)?;
    let killed = Instant::now();
    wait_new_leader(&[&b, &c], old_epoch)?;
    Ok(killed.elapsed().as_secs_f64() * 1e3)
}

/// Runs the multi-device demo on the library `demo` already created and indexed in
/// `root/a`. Returns whether the three final digests are equal.
pub(crate) fn run(n: &mut u32, root: &Path, tree: &Path, files: &[PathBuf]) -> Result<bool> {
    let mut a = Device::new(root, "A")?;
    let mut b = Device::new(root, "B")?;
    let mut c = Device::new(root, "C")?;

    step(n, &format!("A serves the library on {}", a.addr));
    a.serve(&[])?;
    println!(
        "    A is {} ({})",
        str_of(&a.status()?, "role"),
        epoch_of(&a.status()?)
    );

    for joiner in [&mut b, &mut c] {
        step(n, &format!("{} pairs with A using a code", joiner.label));
        let t = Instant::now();
        let code = a.run(&["pair", "invite", "demo", "--yes"])?;
        let code = code.lines().next().unwrap_or("").trim().to_string();
        println!("    A's code: {code}");
        let addr = a.addr.to_string();
        joiner.run(&[
            "pair",
            "join",
            "--addr",
            &addr,
            "--code",
            &code,
            "--name",
            joiner.label,
        ])?;
        println!("    paired in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    step(
        n,
        "B and C serve with no --peer (each remembers A from pairing; A tells them of each other)",
    );
    let t = Instant::now();
    b.serve(&[])?;
    c.serve(&[])?;
    let statuses = converge(&[&a, &b, &c])?;
    println!("    converged in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    show_roles(&[&a, &b, &c], &statuses);

    step(
        n,
        "B and C index the same photos as their own locations (contents match A's by hash)",
    );
    for d in [&b, &c] {
        let line = d.run(&["index", "demo", &tree.to_string_lossy()])?;
        println!("    {}: {}", d.label, line.trim());
    }
    converge(&[&a, &b, &c])?;

    step(
        n,
        "C is cut off; B tags a file while C annotates another offline",
    );
    c.stop(false)?;
    let tagged = files.get(3).context("a file to tag")?;
    let noted = files.get(4).context("a file to annotate")?;
    b.run(&[
        "tag",
        "demo",
        &tagged.to_string_lossy(),
        "from-b",
        "while-c-away",
    ])?;
    c.run(&[
        "note",
        "demo",
        &noted.to_string_lossy(),
        "written offline on C",
    ])?;
    let c_status = c.run(&["status", "demo", "--json"])?;
    let c_status: Value = serde_json::from_str(&c_status)?;
    println!(
        "    C holds {} change(s) waiting to be pushed",
        c_status["journal"]["offline"]
    );

    step(n, "C comes back and pushes what it wrote offline");
    let t = Instant::now();
    c.serve(&[])?;
    converge(&[&a, &b, &c])?;
    println!("    converged in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);

    // A leads unless the others elected one meanwhile (a slow machine can make A look silent).
    let mut devs = [a, b, c];
    let mut leader_at = 0;
    for (i, d) in devs.iter().enumerate() {
        if str_of(&d.status()?, "role") == "leader" {
            leader_at = i;
        }
    }
    let victim = devs[leader_at].label;
    step(n, &format!("the leader {victim} is killed (kill -9)"));
    let old_epoch = devs[leader_at].status()?["epoch"]["counter"]
        .as_u64()
        .unwrap_or(0);
    devs[leader_at].stop(true)?;
    let killed = Instant::now();
    let others: Vec<&Device> = devs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader_at)
        .map(|(_, d)| d)
        .collect();
    let (leader, status) = wait_new_leader(&others, old_epoch)?;
    println!(
        "    {leader} leads {} after {:.0} ms",
        epoch_of(&status),
        killed.elapsed().as_secs_f64() * 1e3
    );
    let after = files.get(5).context("a file to tag")?;
    others[0].run(&["tag", "demo", &after.to_string_lossy(), "after-failover"])?;
    println!(
        "    {} tagged another file in the new epoch",
        others[0].label
    );

    step(
        n,
        &format!("{victim} comes back (no --peer: it remembers its peers) and steps down"),
    );
    let t = Instant::now();
    devs[leader_at].serve(&[])?;
    let [a, b, c] = &mut devs;
    let statuses = converge(&[a, b, c])?;
    println!("    converged in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    show_roles(&[a, b, c], &statuses);
    if str_of(&statuses[leader_at], "role") == "leader" {
        bail!("{victim} did not step down");
    }

    step(n, "checking what each device sees");
    for d in [&*a, &*b, &*c] {
        let tagged_view: Value = serde_json::from_str(&d.run(&[
            "show",
            "demo",
            &tagged.to_string_lossy(),
            "--json",
        ])?)?;
        let noted_view: Value =
            serde_json::from_str(&d.run(&["show", "demo", &noted.to_string_lossy(), "--json"])?)?;
        let tags = &tagged_view["content_metadata"]["tags"];
        let note = &noted_view["content_metadata"]["notes"];
        println!("    {}: tags {tags}, offline note {note}", d.label);
        if !tags.to_string().contains("from-b") || note.is_null() {
            bail!("{} is missing a change", d.label);
        }
    }

    let digests: Vec<String> = statuses
        .iter()
        .map(|s| str_of(s, "digest").to_string())
        .collect();
    println!();
    for (d, digest) in [&*a, &*b, &*c].iter().zip(&digests) {
        println!("digest {}  {digest}", d.label);
    }
    for d in [a, b, c] {
        d.stop(false)?;
    }
    Ok(digests.windows(2).all(|w| w[0] == w[1]))
}
