// The receipt link on the patient's end page. Asked for once the patient is
// admitted (the server gives none before the consultation starts), with the
// key the patient's socket was given then, once (the therapist, who holds the
// invite link too, gets none, nor does a socket that joins later), while the
// invite link still works (it stops at the end); the link is kept in this
// page's memory only, and offered once the consultation is over. The key is
// kept for the tab's life (sessionStorage), so that a reload in the call can
// still ask.
import "./i18n_receipt.js";

export class ReceiptOffer {
  constructor(box, link) {
    this.box = box;
    this.link = link;
    this.url = null;
  }

  // Ask the server for a receipt of the invite's consultation; a failure
  // only means there is none to offer.
  async ask(inviteApi, key) {
    if (this.url || !key) return; // one per page: a reconnect needs no new one
    try {
      const response = await fetch(`${inviteApi}/receipt`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ receipt_key: key }),
      });
      if (response.ok) this.url = (await response.json()).receipt_url;
    } catch {
      // No connection now: the page goes on without a receipt.
    }
  }

  // The key the admission gave, kept for this tab (``where``: the invite's API path).
  keepKey(where, key) {
    if (!key) return;
    try {
      sessionStorage.setItem(`receiptKey:${where}`, key);
    } catch {
      // No storage (a private mode that refuses it): a reload then offers no receipt.
    }
  }

  keptKey(where) {
    try {
      return sessionStorage.getItem(`receiptKey:${where}`);
    } catch {
      return null;
    }
  }

  // Offer the receipt at the end of ``section`` (the end page, or the page
  // that says the consultation is over).
  show(section) {
    if (!this.url) return;
    this.link.href = this.url;
    section.append(this.box);
    this.box.hidden = false;
  }
}
